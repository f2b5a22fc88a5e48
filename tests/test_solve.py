"""The flight solve: links from synthetic homographies, robust least squares, flight breaks."""
import numpy as np

import uavloc as U


def similarity(x: float, y: float, yaw_deg: float, scale: float, pp=(400.0, 300.0)) -> np.ndarray:
    """Image px -> map px of a nadir frame whose principal point lands on (x, y), turned by yaw."""
    c, s = np.cos(np.radians(yaw_deg)), np.sin(np.radians(yaw_deg))
    return np.array([[scale * c, -scale * s, x], [scale * s, scale * c, y], [0, 0, 1]]) @ \
        np.array([[1, 0, -pp[0]], [0, 1, -pp[1]], [0, 0, 1]])


def line_flight(n: int):
    """n frames along a bending line, yaw flipping by 180 degrees halfway, scale varying."""
    truth = {i: (300.0 + 60 * i, 500.0 + 8 * i + 0.5 * i * i) for i in range(n)}
    maps = {i: similarity(*truth[i], 0.0 if i < n // 2 else 180.0, 0.9 + 0.01 * i) for i in range(n)}
    return truth, maps


def test_link_offsets_are_exact_on_synthetic_homographies():
    truth, maps = line_flight(12)
    pp = {i: (400.0, 300.0) for i in truth}
    links = [U.Link(a, a + 1, np.linalg.inv(maps[a + 1]) @ maps[a], 200) for a in range(11)]
    axes = U.frame_axes(links, {0: maps[0]}, pp)              # one map homography: the rest carried by links
    assert set(axes) == set(truth)
    for i in truth:
        np.testing.assert_allclose(axes[i], maps[i][:2, :2], atol=1e-9)
    cfg = U.load_settings().solve
    for o in U.link_offsets(links, axes, pp, cfg):
        np.testing.assert_allclose(o.d, np.subtract(truth[o.a], truth[o.b]), atol=1e-6)
        assert o.sigma == np.hypot(cfg.link_sigma_px * np.sqrt(100 / 200), cfg.link_relative * np.hypot(*o.d))


def chain(n: int, noise: float, seed: int = 0):
    truth, _ = line_flight(n)
    rng = np.random.default_rng(seed)
    offsets = [U.Offset(a, a + 1, tuple(np.subtract(truth[a], truth[a + 1]) + rng.normal(0, noise, 2)), 3.0)
               for a in range(n - 1)]
    return truth, offsets


def test_every_third_map_fix_an_outlier_comes_back_within_5px():
    truth, offsets = chain(30, noise=1.0)
    rng = np.random.default_rng(1)
    fixes = []
    for i in truth:
        wrong = np.array([300.0, -250.0]) * (1 + (i % 2)) if i % 3 == 0 else rng.normal(0, 8, 2)
        fixes.append(U.Fix(i, tuple(np.add(truth[i], wrong)), 12.0))
    start = {f.i: f.xy for f in fixes}                           # the greedy answer: outliers included
    sol = U.solve_positions({}, start, offsets, fixes)
    err = [np.hypot(*np.subtract(sol.xy[i], truth[i])) for i in truth]
    assert max(err) < 5.0, err
    assert all(sol.fix_residual[i] > 200 for i in truth if i % 3 == 0)   # the outliers stand out
    assert all(sol.fix_residual[i] < 40 for i in truth if i % 3)


def test_a_run_anchored_at_one_end_only():
    truth, offsets = chain(21, noise=0.5)
    fixed = {0: truth[0]}                                        # a train truth at the start, nothing else
    start = {i: (2500.0, 1200.0) for i in truth if i}            # no useful prior at all
    sol = U.solve_positions(fixed, start, offsets, [])
    err = [np.hypot(*np.subtract(sol.xy[i], truth[i])) for i in sol.xy]
    assert max(err) < 5.0, err
    assert sol.sigma[20] > sol.sigma[1] > 0                      # the uncertainty grows along the chain
    assert U.reached(list(start), set(fixed), [U.Link(a, a + 1, np.eye(3), 100) for a in range(20)]) == set(start)
    assert U.reached(list(start), set(fixed), [U.Link(a, a + 1, np.eye(3), 100) for a in range(5, 20)]) == set()


def test_the_solve_is_deterministic():
    truth, offsets = chain(40, noise=2.0)
    fixes = [U.Fix(i, tuple(np.add(truth[i], (50.0 * (i % 4 == 0), 0))), 12.0) for i in truth if i % 2]
    start = {i: (0.0, 0.0) for i in truth}
    a = U.solve_positions({}, start, offsets, fixes)
    b = U.solve_positions({}, start, offsets, fixes)
    assert a.xy == b.xy and a.sigma == b.sigma and a.fix_residual == b.fix_residual


def est(i, x, y):
    return U.Estimate(i, x, y, U.Source.TRUTH)


def test_a_flight_break_adds_no_link():
    cfg = U.load_settings().solve                               # link_ids = 2
    ids = [1, 2, 3, 4, 72, 2468, 2469, 2470, 2471, 2472]
    known = {2: est(2, 100, 100), 3: est(3, 380, 100), 2470: est(2470, 4000, 900), 2471: est(2471, 900, 2000)}
    pairs = U.temporal_pairs(ids, known, cfg, reach=900.0)
    assert pairs == [(1, 2), (1, 3), (2, 4), (3, 4), (2468, 2469), (2468, 2470), (2469, 2470), (2471, 2472)]
    # no pair spans the id jumps (4 -> 72 -> 2468), nor the train truths 3300 px apart (2470 -> 2471),
    # and two train frames (2, 3) are never linked: both are fixed


def test_fixes_are_dropped_by_seed():
    cfg = U.load_settings(overrides=["solve.drop_map_fixes=0.5", "solve.seed=4"]).solve
    a, b = U.dropped_fixes(list(range(100)), cfg), U.dropped_fixes(list(range(100)), cfg)
    assert a == b and len(a) == 50
    assert U.dropped_fixes(list(range(100)), U.load_settings().solve) == set()
