"""The flight's pose graph: exact poses from synthetic homographies, truths alone fixing heading and
scale, rejected outlier fixes, a run anchored at one end, links across legs, the lean from opposite
headings."""
from pathlib import Path

import numpy as np
import pytest

import uavloc as U

PP = (400.0, 300.0)
LEAN = (0.0, 0.06)
FOCAL = 660.0


def frame(i: int, truth=None) -> U.Frame:
    return U.Frame(i, Path(f"{i}.JPG"), 800, 600, FOCAL, FOCAL, PP[0], PP[1], "train" if truth else "test", truth)


def image_to_map(pose, f: U.Frame, lean) -> np.ndarray:
    """The homography image px -> map px of a frame whose camera leans by `lean` (its nadir `lean` x focal
    from the principal point) and whose levelled view has this pose (truth point, heading, scale)."""
    x, y, heading, scale = pose
    c, s = np.cos(np.radians(heading)), np.sin(np.radians(heading))
    return U.translate_h(x, y) @ np.array([[scale * c, -scale * s, 0], [scale * s, scale * c, 0], [0, 0, 1]]) @ \
        U.translate_h(-PP[0], -PP[1]) @ U.leveling(f, lean)


def lawnmower(legs: int = 3, per_leg: int = 8, step: float = 90.0, spacing: float = 220.0):
    """Legs north-south, the heading flipping by 180 degrees each leg, the scale varying frame to frame;
    returns truth poses {id: (x, y, heading, scale)}."""
    poses = {}
    for i in range(legs * per_leg):
        leg, j = divmod(i, per_leg)
        y = 400 + step * (j if leg % 2 == 0 else per_leg - 1 - j)
        poses[i] = (500 + spacing * leg, y, 90.0 if leg % 2 == 0 else -90.0, 1.10 + 0.02 * np.sin(i))
    return poses


def problem(poses, truth_ids, links_between, fixes=None, lean=LEAN, k=None, truth_lean=LEAN):
    """A FlightProblem whose links are the exact homographies between leaning cameras at the true
    poses. `truth_lean` is how the cameras really lean; `lean` how the problem takes them to."""
    frames = {i: frame(i, poses[i][:2] if i in truth_ids else None) for i in poses}
    G = {i: image_to_map(poses[i], frames[i], truth_lean) for i in poses}
    links = tuple(U.Link(a, b, np.linalg.inv(G[b]) @ G[a], 200, 0) for a, b in links_between)
    k = k or FOCAL * float(np.mean([p[3] for p in poses.values()]))
    return U.FlightProblem(frames, {i: U.leveling(frames[i], lean) for i in poses}, {i: poses[i][:2] for i in truth_ids},
                           fixes or {}, links, {i: 0.8 for i in poses}, {i: 0.0 for i in poses}, k,
                           {i: (0.0, 0.0) for i in poses}), G


def chain_links(ids):
    return [(a, a + 1) for a in ids[:-1]]


@pytest.fixture(scope="module")
def gtsam():
    return U.gtsam_module(U.load_settings())


def graph_cfg(**values):
    return U.load_settings().with_values({f"graph.{k}": v for k, v in values.items()}).graph


def test_truths_alone_give_exact_poses_across_180_degree_leg_flips(gtsam):
    """No map fix at all: train truths on every third frame, links between consecutive frames (the
    turns included). Positions, headings and scales come back exactly; the truths' priors leave heading
    and scale free, so the links and two truths set them."""
    poses = lawnmower()
    truth_ids = [i for i in poses if i % 3 == 0]
    p, _ = problem(poses, truth_ids, chain_links(sorted(poses)))
    sol = U.solve_flight(p, graph_cfg(height_sigma=100.0), gtsam)
    for i, (x, y, heading, scale) in poses.items():
        got = sol.poses[i]
        assert np.hypot(got.x - x, got.y - y) < 0.05, (i, got)
        assert abs(U.angle_diff(got.heading, heading)) < 0.01 and abs(got.scale / scale - 1) < 1e-4, (i, got)
    assert sol.reached == frozenset(poses)
    assert all(sol.poses[i].sigma_px < 5 for i in poses)


def test_outlier_fixes_stand_out_and_the_solution_keeps_to_the_links(gtsam):
    """Every frame has a map fix; every fourth is 300-600 px off. The robust fixes do not drag the
    chain: the solution moves by less than half a pixel from the one without them, and the outliers'
    residuals exceed graph.fix_outlier_px."""
    poses = lawnmower()
    rng = np.random.default_rng(0)
    fixes = {}
    for i, (x, y, heading, scale) in poses.items():
        off = np.array([300.0, -200.0]) * (1 + i % 2) if i % 4 == 0 else rng.normal(0, 3, 2)
        fixes[i] = U.Fix(U.Pose(x + off[0], y + off[1], heading, scale), 8.0, 2.0, 0.03)
    outliers = {i for i in poses if i % 4 == 0 and i > 1}
    p, _ = problem(poses, [0, 1], chain_links(sorted(poses)), fixes)
    clean, _ = problem(poses, [0, 1], chain_links(sorted(poses)), {i: f for i, f in fixes.items() if i not in outliers})
    cfg = graph_cfg()
    sol, without = U.solve_flight(p, cfg, gtsam), U.solve_flight(clean, cfg, gtsam)
    for i, (x, y, _, _) in poses.items():
        assert np.hypot(sol.poses[i].x - x, sol.poses[i].y - y) < 2.0, i      # the fixes' own 3 px noise
        assert np.hypot(sol.poses[i].x - without.poses[i].x, sol.poses[i].y - without.poses[i].y) < 0.5, i
    assert all(sol.fix_residual[i] > cfg.fix_outlier_px for i in outliers)
    assert all(sol.fix_residual[i] < 15 for i in poses if i not in outliers and i > 1)


def test_a_run_anchored_at_one_end_only_grows_its_sigma_along_the_chain(gtsam):
    """Two train truths at the start of a 24-frame leg and nothing else: the leg is placed from them
    (start positions useless), and the 1-sigma grows with the distance along the chain."""
    poses = lawnmower(legs=1, per_leg=24)
    p, _ = problem(poses, [0, 1], chain_links(sorted(poses)))
    sol = U.solve_flight(p, graph_cfg(height_sigma=100.0), gtsam)
    for i, (x, y, _, _) in poses.items():
        assert np.hypot(sol.poses[i].x - x, sol.poses[i].y - y) < 0.5, i
    sigma = [sol.poses[i].sigma_px for i in sorted(poses)]
    assert all(a < b for a, b in zip(sigma[1:], sigma[2:])) and sigma[23] > 10 * sigma[2], sigma


def test_a_component_nothing_anchors_is_not_reached(gtsam):
    poses = lawnmower(legs=2)
    p, _ = problem(poses, [0, 1, 2], chain_links(list(range(8))) + chain_links(list(range(8, 16))))
    sol = U.solve_flight(p, graph_cfg(), gtsam)
    assert sol.reached == frozenset(range(8))
    assert all(U.reached(sol, i, (5000, 2500)) for i in range(8))
    assert not any(U.reached(sol, i, (5000, 2500)) for i in range(8, 16))


def test_a_correlation_fix_places_a_position_and_leaves_heading_and_scale_to_the_links(gtsam):
    """One truth at a leg's start and one position-only fix (a correlation fix, found at a heading 20
    degrees and a scale 10% wrong) at its end: the two positions place and orient the whole chain as
    two truths would, and the fix's own heading and scale pull at nothing."""
    poses = lawnmower(legs=1)
    x, y, heading, scale = poses[7]
    fix = U.Fix(U.Pose(x, y, heading + 20.0, scale * 1.1), 4.0, np.degrees(U.LOOSE), U.LOOSE)
    p, _ = problem(poses, [0], chain_links(sorted(poses)), {7: fix})
    sol = U.solve_flight(p, graph_cfg(height_sigma=100.0), gtsam)
    for i, (x, y, heading, scale) in poses.items():
        assert U.reached(sol, i, (5000, 2500)), i
        assert np.hypot(sol.poses[i].x - x, sol.poses[i].y - y) < 0.5, i
        assert abs(U.angle_diff(sol.poses[i].heading, heading)) < 0.1 and abs(sol.poses[i].scale / scale - 1) < 1e-3


def test_one_truth_leaves_the_heading_free_and_the_frames_unplaced(gtsam):
    poses = lawnmower(legs=1)
    p, _ = problem(poses, [3], chain_links(sorted(poses)))
    sol = U.solve_flight(p, graph_cfg(), gtsam)
    assert U.reached(sol, 3, (5000, 2500))          # the truth itself
    assert not U.reached(sol, 7, (5000, 2500))      # four links away, heading unknown


def test_links_across_legs_pick_one_frame_per_adjacent_leg():
    poses = {i: U.Pose(*p) for i, p in lawnmower().items()}
    pairs = U.cross_pairs(poses, [9], sorted(poses), set(), U.load_settings().links, reach=600.0)
    legs = U.legs(sorted(poses), poses)
    assert len(pairs) == 2 and {legs[a if a != 9 else b] for a, b in pairs} == {1, 3}
    # adjacent legs fly the other way: their upright views differ by a half turn
    assert all(abs(U.upright_turn(poses[a].heading) - U.upright_turn(poses[b].heading)) == 180 for a, b in pairs)
    # frame 9 (leg 2, second frame) is nearest to frame 6 (leg 1's end) and frame 22 (leg 3)
    assert {a if a != 9 else b for a, b in pairs} == {6, 22}


def test_the_lean_is_found_from_train_frames_of_opposite_headings(gtsam):
    """The truth lies 0.045 f behind the image centre; the problem starts from the default 0.06. With
    frames of both headings linked across legs, the lean that makes truths and links agree is found."""
    poses = lawnmower(legs=4, per_leg=6)
    ids = sorted(poses)
    legs = [ids[n:n + 6] for n in range(0, 24, 6)]
    across = [(a, b) for l1, l2 in zip(legs, legs[1:]) for a in l1 for b in l2 if abs(poses[a][1] - poses[b][1]) < 1]
    cfg = U.load_settings().truth

    def problem_for(lean):
        return problem(poses, ids, chain_links(ids) + across, lean=lean, truth_lean=(0.0, 0.045))[0]

    lean = U.lean_from_flight(problem_for, ids, cfg, graph_cfg(), gtsam, log=U.quiet)
    assert lean is not None and abs(lean[1] - 0.045) <= cfg.lean_step / 2 + 1e-9 and abs(lean[0]) < 1e-9
    one_way = {i: p for i, p in poses.items() if i < 6}
    assert U.lean_from_flight(lambda lean: problem(one_way, sorted(one_way), chain_links(sorted(one_way)),
                                                   lean=lean)[0], sorted(one_way), cfg, graph_cfg(), gtsam,
                              log=U.quiet) is None


def test_registrations_teach_the_lean_only_where_they_pin_it_down():
    """Train frames registered at their truths with the leans given: a tight few (the median known to
    within truth.lean_step) hold, and the calibration takes their lean; as many scattered ones (a map
    that mostly fails, its few matches wrong) do not, and the flight's own lean is kept; two are too few."""
    cfg = U.load_settings().truth

    def registered(leans):
        out = []
        for n, lean in enumerate(leans):
            truth = (1000.0 + 300 * n, 800.0)
            f = frame(n + 1, truth)
            out.append((f, image_to_map((*truth, 30.0 * n, 0.9), f, lean)))
        return out

    tight = registered([(0.0, 0.060), (0.002, 0.058), (-0.001, 0.061), (0.001, 0.059)])
    scattered = registered([(0.02, 0.02), (0.0, 0.13), (0.03, 0.09)])
    assert np.allclose(U.truth_leans(tight)[0], (0.0, 0.06), atol=1e-9)
    assert U.registered_lean_holds(tight, cfg) and not U.registered_lean_holds(scattered, cfg)
    assert not U.registered_lean_holds(tight[:2], cfg)
    height = U.Height(600.0, 0.0, U.HeightSource.GIVEN)
    flight = ((-0.02, 0.06), U.LeanSource.FLIGHT)
    assert U.fit_calibration(tight, 4, height, cfg, ((0.0, 0.06), U.LeanSource.DEFAULT), log=U.quiet).lean_source \
        is U.LeanSource.REGISTERED
    kept = U.fit_calibration(scattered, 3, height, cfg, flight, log=U.quiet)
    assert kept.lean == (-0.02, 0.06) and kept.lean_source is U.LeanSource.FLIGHT


def test_a_link_between_leaning_cameras_measures_the_relative_pose_exactly():
    """Levelled, the link between two leaning cameras is the similarity between their poses, exactly."""
    gtsam = U.gtsam_module(U.load_settings())
    poses = lawnmower()
    p, G = problem(poses, [], [(7, 8)])
    T = U.link_measurement(p.links[0], p, gtsam)
    Xa, Xb = (U.Pose(*poses[i]).node(gtsam) for i in (7, 8))
    np.testing.assert_allclose((Xa.inverse() * Xb).matrix(), T.matrix(), atol=1e-9)


def test_frames_are_interpolated_by_id_between_placed_ones_and_extrapolated_at_the_ends():
    out = U.id_interpolated([1, 2, 3, 5, 7, 8], {3: (30.0, 0.0), 5: (50.0, 10.0), 7: (70.0, 20.0)}, (0, 0))
    assert out[2] == (20.0, -5.0) and out[1] == (10.0, -10.0) and out[8] == (80.0, 25.0)
    assert U.id_interpolated([4], {3: (30.0, 0.0), 5: (50.0, 10.0)}, (0, 0))[4] == (40.0, 5.0)
    assert U.id_interpolated([4], {}, (7.0, 8.0))[4] == (7.0, 8.0)
