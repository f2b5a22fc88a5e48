"""The height from frame pairs (one pair is evidence), links along a leg and across its end, the map
level from the data, locate's flags."""
from pathlib import Path

import cv2
import numpy as np
import pytest

import uavloc as U
from conftest import weights_present


def crop_frame(map_gray, centre, scale, size, path, heading=0.0):
    """A nadir frame of `size` px cut from the map around `centre` at `scale` map px per image px, its
    image x-axis pointing `heading` degrees on the map."""
    w, h = size
    c, s = np.cos(np.radians(heading)), np.sin(np.radians(heading))
    H = U.translate_h(*centre) @ np.array([[scale * c, -scale * s, 0], [scale * s, scale * c, 0], [0, 0, 1]]) @ \
        U.translate_h(-w / 2, -h / 2)                                     # image -> map
    img = cv2.warpPerspective(map_gray, np.linalg.inv(H), (w, h), flags=cv2.INTER_AREA)
    cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return path


@pytest.fixture(scope="module")
def leg(tmp_path_factory):
    """Seven frames 1.25 map px per image px, focal 600 (k = 750): five along a leg heading 0 (110 map
    px apart, image x along the motion), then the leg's end: two frames flown back, turned by 180."""
    folder = tmp_path_factory.mktemp("leg")
    map_gray = U.synthetic_map(1800, 1200, seed=3)[..., 1]
    frames = {}
    spots = [((500.0 + 110 * n, 600.0), 0.0) for n in range(5)] + [((1000.0, 640.0), 180.0), ((890.0, 640.0), 180.0)]
    for n, (xy, heading) in enumerate(spots, start=1):
        path = crop_frame(map_gray, xy, 1.25, (640, 480), folder / f"{n:04d}.JPG", heading)
        frames[n] = U.Frame(n, path, 640, 480, 600.0, 600.0, 320.0, 240.0, "train", xy)
    s = U.load_settings(overrides=["features.backend=sift", "links.max_shift=0.5"])
    views = U.build_views(s, U.build_backend(s), folder, U.Stopwatch())
    ds = U.Dataset(folder, folder / "map.png", frames)
    return ds, U.Linker(views, s), s


def test_links_follow_the_leg_while_frames_overlap_and_turn_at_its_end(leg):
    ds, linker, s = leg
    links = {(k.a, k.b): k for k in U.temporal_links(linker, ds, sorted(ds.frames), log=U.quiet)}
    # 110 map px = 88 image px = 0.18 of the 480-px side a step: +1 and +2 (0.37) within links.max_shift
    # 0.5, +3 (0.55) beyond it; across the leg's end the next frame matches turned by 180 (SIFT needs no
    # turn of the view to find it)
    assert {(1, 2), (1, 3), (2, 3), (2, 4), (3, 4), (3, 5), (4, 5), (5, 6), (6, 7)} <= set(links)
    assert (1, 4) not in links and (4, 6) not in links and (5, 7) not in links    # nothing across the turn
    yaw = {p: U.homography_yaw(k.H, ds.frames[p[0]].principal_point) for p, k in links.items()}
    assert abs(abs(yaw[(5, 6)]) - 180) < 1 and all(abs(y) < 1 for p, y in yaw.items() if p != (5, 6))
    assert not links[(5, 6)].straight(ds.frames[5]) and links[(4, 5)].straight(ds.frames[4])


@pytest.mark.weights
@pytest.mark.skipif(not weights_present("aliked"), reason="aliked weights absent")
def test_each_frame_is_linked_at_its_upright_view(tmp_path):
    """A leg flown heading 180, then back heading 0: the chain starts from the first train pair turned
    north-up (their motion against their truths: heading 180, turn 180), and each later frame is seen at
    the turn at which it met the one before it (across the leg's end, turned back by 180). So every
    frame's view is its upright one, which its map search uses too (ALIKED: not rotation invariant)."""
    map_gray = U.synthetic_map(1800, 1200, seed=3)[..., 1]
    spots = [((1000.0 - 110 * n, 600.0), 180.0) for n in range(3)] + [((800.0, 560.0), 0.0), ((910.0, 560.0), 0.0)]
    frames = {}
    for n, (xy, heading) in enumerate(spots, start=1):
        path = crop_frame(map_gray, xy, 1.25, (640, 480), tmp_path / f"{n:04d}.JPG", heading)
        frames[n] = U.Frame(n, path, 640, 480, 600.0, 600.0, 320.0, 240.0, "train", xy)
    s = U.load_settings(overrides=["features.backend=aliked"])
    views = U.build_views(s, U.build_backend(s), tmp_path, U.Stopwatch())
    links = {(k.a, k.b): k for k in U.temporal_links(U.Linker(views, s), U.Dataset(tmp_path, tmp_path / "map.png",
                                                                                  frames), sorted(frames), log=U.quiet)}
    assert {(1, 2), (2, 3), (3, 4), (4, 5)} <= set(links)
    assert links[(3, 4)].turn == 180 and links[(1, 2)].turn == 0
    for n, (_, heading) in enumerate(spots, start=1):
        f = frames[n]
        assert views.cached(f, views.working_scale(f), U.upright_turn(heading)), n
    # turn 0 is frame 1 and 2's own view (the seed pair) and frame 5's upright one; 3 was never seen at 0
    assert not views.cached(frames[3], views.working_scale(frames[3]), 0)


def test_one_pair_gives_the_height_and_the_heading(leg):
    """k = 1.25 x 600 = 750 from a single pair; its heading 0 (image x is map x)."""
    ds, linker, s = leg
    link = linker.match(ds.frames[1], ds.frames[2])
    k, heading = U.pair_motion(link, ds.frames[1], ds.frames[2])
    assert abs(k - 750) < 0.01 * 750 and abs(heading) < 1
    height = U.height_from_links([link], ds, s.height)
    assert height.source is U.HeightSource.PAIRS and len(height.pairs) == 1 and abs(height.k - 750) < 7.5
    assert U.height_from_links([], ds, s.height) is None


def test_pairs_are_weighted_by_inliers(leg):
    """A weak pair whose truths claim twice the height is outweighed by a strong one."""
    import dataclasses
    ds, linker, s = leg
    strong = dataclasses.replace(linker.match(ds.frames[1], ds.frames[2]), inliers=300)
    weak = dataclasses.replace(linker.match(ds.frames[3], ds.frames[4]), inliers=45)
    far = dataclasses.replace(ds.frames[4], truth=(ds.frames[3].truth[0] + 220.0, 600.0))
    ds2 = U.Dataset(ds.root, ds.map_path, {**ds.frames, 4: far})
    assert abs(U.pair_motion(weak, ds2.frames[3], far)[0] - 1500) < 15
    assert abs(U.height_from_links([strong, weak], ds2, s.height).k - 750) < 7.5


def test_map_level_follows_the_frames_detail():
    cfg = U.load_settings().features                       # map_level 0: from the data
    assert U.Backend.map_level(cfg, 0.70) == pytest.approx(2 ** -0.5)   # real5: 512-px frames at k 600
    assert U.Backend.map_level(cfg, 1.9) == 1.0            # finer than the map: full resolution, never above
    assert U.Backend.map_level(cfg, 0.05) == cfg.map_level_min
    assert U.Backend.map_level(cfg, 0.88) == pytest.approx(2 ** -0.125)   # 640 of 800-px frames at k 600
    fixed = U.load_settings(overrides=["features.map_level=0.5"]).features
    assert U.Backend.map_level(fixed, 1.9) == 0.5


def test_the_working_scale_is_the_frames_own_and_xfeat_sees_twice_the_pixels(tmp_path):
    s = U.load_settings(overrides=["features.backend=sift"])
    views = U.build_views(s, U.build_backend(s), tmp_path, U.Stopwatch())
    big = U.Frame(1, Path("a.JPG"), 8000, 6000, 6592.0, 6592.0, 4000.0, 3000.0, "train", (0.0, 0.0))
    small = U.Frame(2, Path("b.JPG"), 320, 240, 264.0, 264.0, 160.0, 120.0, "train", (0.0, 0.0))   # < max_side
    side = s.preprocess.max_side
    assert views.working_scale(big) == pytest.approx(side / 8000, rel=0.025)      # snapped to the scale grid
    assert views.working_scale(small) == 1.0                                       # never upsampled
    detail, footprint = U.frame_detail([big], views, 600.0)
    assert detail == pytest.approx(views.working_scale(big) * 6592 / 600) and footprint == pytest.approx(8000 * 600 / 6592)

    class Coarse(U.SiftBackend):
        detail_factor = 2.0

    coarse = U.QueryViews(Coarse(s.features, Path("w"), "cpu", Path("w")), s.preprocess, s.features.query_scale_step,
                          None, U.FrameDecoder(False), U.Stopwatch())
    assert coarse.working_scale(big) == pytest.approx(2 * side / 8000, rel=0.05)


@pytest.mark.parametrize("args, message", [
    (["--altitude", "120"], "go together"),
    (["--altitude", "120", "--map-gsd", "0.2", "--scale", "1.4"], "not both"),
    (["--scale", "-1"], "must be positive"),
])
def test_locate_scale_flags_are_checked(args, message, capsys):
    base = ["--mode", "locate", "--map", "m.png", "--frame", "f.JPG", "--fx", "1", "--fy", "1", "--cx", "1",
            "--cy", "1", "--prior", "1,1"]
    assert U.main(base + args) == U.UsageError.exit_code
    assert message in capsys.readouterr().err


@pytest.mark.weights
@pytest.mark.skipif(not weights_present("disk"), reason="disk weights absent")
@pytest.mark.parametrize("ratio, chosen", [(0.85, ""), (0.01, "real")])
def test_the_backend_choice_falls_back_only_when_the_backend_registers_too_few(demo_data, tmp_path, ratio, chosen):
    """SIFT at its usual ratio registers the demo's probes and is kept; at a ratio no match passes it
    registers none, and the `real` preset (DISK), which registers them, is chosen instead."""
    s = U.load_settings(overrides=["features.backend=sift", f"features.sift_ratio={ratio}", "height.probes=2"])
    ds = U.load_dataset(demo_data)
    views = U.build_views(s, U.build_backend(s), tmp_path, U.Stopwatch())
    probes = U.train_probes(U.Linker(views, s), ds, s)
    map_gray = U.read_image(ds.map_path)
    guess = U.footprint_guess((map_gray.shape[1], map_gray.shape[0]), ds.frames[ds.train_ids[0]], s.height)
    choice, chosen_views, _ = U.choose_backend(s, probes, views, ds.map_path, map_gray, tmp_path, guess, log=U.quiet)
    assert choice.preset == chosen
    assert chosen_views.backend.name == ("disk" if chosen else "sift")
    tried = {t[1]: t[2] for t in choice.tried}
    if chosen:
        assert tried["sift"] == 0 and tried["disk"] > 0
    else:
        assert tried["sift"] >= len(probes) / 2 and "disk" not in tried       # the fallback not even tried


@pytest.mark.weights
@pytest.mark.skipif(not weights_present("aliked"), reason="aliked weights absent")
def test_frames_of_crossing_legs_link_at_their_upright_views(tmp_path):
    """ALIKED's descriptors do not survive a quarter turn: a frame heading 0 and one heading 90 or 180
    over the same ground link only when each view is turned upright by its heading (each frame then
    needs one turned view for every leg it meets), and the link carries the heading difference."""
    map_gray = U.synthetic_map(1400, 1000, seed=5)[..., 1]
    s = U.load_settings(overrides=["features.backend=aliked"])
    views = U.build_views(s, U.build_backend(s), tmp_path, U.Stopwatch())
    linker = U.Linker(views, s)
    spots = {1: ((700.0, 500.0), 0.0), 2: ((740.0, 520.0), 90.0), 3: ((690.0, 470.0), 180.0)}
    frames, poses = {}, {}
    for i, (xy, heading) in spots.items():
        path = crop_frame(map_gray, xy, 1.25, (640, 480), tmp_path / f"{i:04d}.JPG", heading)
        frames[i] = U.Frame(i, path, 640, 480, 600.0, 600.0, 320.0, 240.0, "train", xy)
        poses[i] = U.Pose(*xy, heading + 5.0, 1.25)                   # a solved heading, a little off
    links = {(k.a, k.b): k for k in U.match_cross(linker, frames, poses, [(1, 2), (1, 3), (2, 3)])}
    assert set(links) == {(1, 2), (1, 3), (2, 3)}
    for (a, b), k in links.items():
        yaw = U.homography_yaw(k.H, frames[a].principal_point)
        assert abs(U.angle_diff(yaw, spots[a][1] - spots[b][1])) < 1, (a, b, yaw)
        assert k.turn == (U.upright_turn(poses[b].heading) - U.upright_turn(poses[a].heading)) % 360
    # the old sense of the quarter turn (the heading difference's sign) finds nothing
    assert linker.attempt(frames[1], frames[2], 90) is None


def test_a_break_in_the_chain_is_bridged_by_the_strongest_link_across_it(tmp_path):
    """Frame 3 of a leg sees nothing (a blank image: a sharp turn or a cloud): 2-3 and 3-4 do not link,
    so the chain is bridged across the break by its strongest link (2-4: 1-4 and 2-5 overlap less), once."""
    map_gray = U.synthetic_map(1400, 900, seed=4)[..., 1]
    frames = {}
    for n in range(1, 6):
        xy = (400.0 + 110 * n, 450.0)
        path = crop_frame(map_gray, xy, 1.25, (640, 480), tmp_path / f"{n:04d}.JPG")
        if n == 3:
            cv2.imwrite(str(path), np.full((480, 640), 128, np.uint8))
        frames[n] = U.Frame(n, path, 640, 480, 600.0, 600.0, 320.0, 240.0, "train", xy)
    s = U.load_settings(overrides=["features.backend=sift"])
    linker = U.Linker(U.build_views(s, U.build_backend(s), tmp_path, U.Stopwatch()), s)
    ds = U.Dataset(tmp_path, tmp_path / "map.png", frames)
    pairs = [(k.a, k.b) for k in U.temporal_links(linker, ds, sorted(frames), log=U.quiet)]
    assert sorted(pairs) == [(1, 2), (2, 4), (4, 5)]
    link = next(k for k in U.temporal_links(linker, ds, sorted(frames), log=U.quiet) if (k.a, k.b) == (2, 4))
    # 220 map px = 176 image px along image x between frames 2 and 4
    assert np.allclose(U.project(link.H, [(320.0, 240.0)])[0], (320.0 - 176.0, 240.0), atol=1.0)
