"""Issue 12: the height from frame pairs, the map level from the data, bounded failure, locate's scale flags."""
from pathlib import Path

import cv2
import numpy as np
import pytest

import uavloc as U


def crop_frame(map_gray, centre, scale, size, path):
    """A north-up nadir frame of `size` px cut from the map around `centre`, `scale` map px per image px."""
    w, h = size
    H = U.translate_h(centre[0] - scale * w / 2, centre[1] - scale * h / 2) @ U.scale_h(scale, scale)  # image -> map
    img = cv2.warpPerspective(map_gray, np.linalg.inv(H), (w, h), flags=cv2.INTER_AREA)
    cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return path


def test_a_frame_pair_gives_the_height_and_the_heading(tmp_path):
    """Two north-up frames 1.25 map px per image px apart by 160 map px, focal 600: k = 1.25 x 600 = 750,
    heading 0 (image x is map x)."""
    map_gray = U.synthetic_map(1600, 1200, seed=3)
    s = U.load_settings(overrides=["features.backend=sift"])
    frames = []
    for n, x in enumerate((700.0, 860.0)):
        path = crop_frame(map_gray, (x, 600.0), 1.25, (640, 480), tmp_path / f"{n}.JPG")
        frames.append(U.Frame(n, path, 640, 480, 600.0, 600.0, 320.0, 240.0, "train", (x, 600.0)))
    views = U.build_views(s, U.build_backend(s), tmp_path)
    pair = U.match_pair(views, s, frames[0], frames[1], U.Stopwatch())
    assert pair is not None and pair.inliers >= 30
    assert abs(pair.k - 750) < 0.02 * 750, pair
    assert abs(pair.heading) < 2 and abs(pair.yaw) < 1 and abs(pair.shift - 128 / 640) < 0.01
    assert U.usable(pair, s.scale)
    assert U.motion_height([pair, pair], s.scale)[0] == pytest.approx(pair.k)
    assert U.motion_height([pair], s.scale) == (None, 0.0)           # fewer than scale.motion_min_pairs


def test_map_level_follows_the_frames_detail():
    cfg = U.load_settings().features                       # map_level 0: from the data
    assert U.AlikedBackend.map_level(cfg, 0.70) == pytest.approx(2 ** -0.5)   # real5: 512-px frames at k 600
    assert U.AlikedBackend.map_level(cfg, 1.9) == 1.0       # finer than the map: full resolution, never above
    assert U.AlikedBackend.map_level(cfg, 0.05) == cfg.map_level_min
    assert U.XFeatBackend.map_level(cfg, 0.35) == pytest.approx(2 * 2 ** -1.5)
    fixed = U.load_settings(overrides=["features.map_level=0.5"]).features
    assert U.AlikedBackend.map_level(fixed, 1.9) == 0.5
    frames = [U.Frame(1, Path("a.JPG"), 8000, 6000, 6592.0, 6592.0, 4000.0, 3000.0, "train", (0.0, 0.0))]
    detail, footprint = U.frame_detail(frames, 600.0, 1400)
    assert detail == pytest.approx(1400 / 8000 * 6592 / 600) and footprint == pytest.approx(8000 * 600 / 6592)


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
