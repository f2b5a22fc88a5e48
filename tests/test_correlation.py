"""The correlation fix: a frame whose heading and scale are known, rendered from the map by an exact
similarity and given another season's look, is found by its dense descriptors alone; a window that does
not hold it gives no fix."""
from pathlib import Path

import cv2
import numpy as np
import pytest

import uavloc as U
from conftest import backends_param

TRUTH = (930.0, 660.0)          # map px of the frame's centre (its truth point: the camera looks straight down)
HEADING, SCALE, FOCAL = 35.0, 1.25, 600.0
SIZE = (640, 480)


def autumn(img: np.ndarray) -> np.ndarray:
    """Another season: hue turned, darker, contrast lower, noise."""
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + 14) % 180
    out = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2BGR).astype(np.float32)
    rng = np.random.default_rng(1)
    return np.clip(0.7 * out + 25 + rng.normal(0, 5, out.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module", params=backends_param("aliked", "disk"))
def scene(request, tmp_path_factory):
    """The demo generator's map; a frame whose px u lands at TRUTH + SCALE R(HEADING) (u - centre)."""
    tmp = tmp_path_factory.mktemp(f"corr-{request.param}")
    world = U.synthetic_map(2400, 1800, 11)
    cv2.imwrite(str(tmp / "map.png"), world)
    a = np.radians(HEADING)
    c = ((SIZE[0] - 1) / 2, (SIZE[1] - 1) / 2)
    to_map = U.translate_h(*TRUTH) @ np.array([[SCALE * np.cos(a), -SCALE * np.sin(a), 0],
                                               [SCALE * np.sin(a), SCALE * np.cos(a), 0], [0, 0, 1]]) @ U.translate_h(-c[0], -c[1])
    img = cv2.warpPerspective(world, to_map, SIZE, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    cv2.imwrite(str(tmp / "frame.JPG"), autumn(img), [cv2.IMWRITE_JPEG_QUALITY, 92])
    frame = U.Frame(1, tmp / "frame.JPG", *SIZE, FOCAL, FOCAL, *c, "test")
    s = U.load_settings(overrides=[f"features.backend={request.param}"])
    views = U.build_views(s, U.build_backend(s), tmp, U.Stopwatch())
    engine = U.build_engine(s, tmp / "map.png", U.read_image(tmp / "map.png"), tmp, SCALE * FOCAL, [frame], views,
                            log=U.quiet)
    return U.Search(engine, s, U.Calibration.seed(SCALE * FOCAL, (0.0, 0.0))), frame


def test_a_frame_at_a_known_heading_and_scale_is_found_by_correlation(scene):
    """The prior 140 px off, radius 250: the peak lands within two descriptor px (5 map px)."""
    search, frame = scene
    est = search.correlate(frame, (TRUTH[0] + 120, TRUTH[1] - 70), [HEADING], SCALE, 250.0)
    assert est.source is U.Source.CORRELATED, est.error
    assert np.hypot(est.x - TRUTH[0], est.y - TRUTH[1]) < 5.0
    assert est.peak_ratio >= search.s.correlation.min_ratio
    xy, scale, heading = U.similarity(est.H, frame.principal_point)
    assert abs(U.angle_diff(heading, HEADING)) < 0.5 and abs(scale / SCALE - 1) < 0.01


def test_without_a_heading_the_headings_are_searched(scene):
    search, frame = scene
    est = search.correlate(frame, (TRUTH[0] - 100, TRUTH[1] + 90), list(np.arange(0.0, 360.0, 15.0)), SCALE, 250.0)
    assert est.source is U.Source.CORRELATED, est.error
    assert np.hypot(est.x - TRUTH[0], est.y - TRUTH[1]) < 15.0     # the nearest heading tried is 5 degrees off
    assert abs(U.angle_diff(U.homography_yaw(est.H, frame.principal_point), HEADING)) <= 7.5


def test_a_window_that_does_not_hold_the_frame_gives_no_fix(scene):
    """The truth 600 px outside the radius: every peak is chance, none stands out."""
    search, frame = scene
    est = search.correlate(frame, (TRUTH[0] + 700, TRUTH[1] + 150), [HEADING], SCALE, 120.0)
    assert est.H is None and est.source is U.Source.UNMATCHED
    assert "x the next" in est.error and est.peak_ratio < search.s.correlation.min_ratio


def registration(scene, truth) -> U.Estimate:
    """The frame registered at `truth` (as a train frame), its keypoints refused by an inlier count no
    match reaches: what is left is the correlation at the flight's heading and scale."""
    search, frame = scene
    s = U.load_settings(overrides=[f"features.backend={search.s.features.backend}", "geometry.min_inliers=100000"])
    train = U.Frame(1, frame.path, frame.width, frame.height, frame.fx, frame.fy, frame.cx, frame.cy, "train", truth)
    return U.register_one(U.Search(search.engine, s, search.calib), train, U.Pose(*truth, HEADING, SCALE), True)


def test_a_train_frame_keypoints_miss_is_registered_by_correlation_at_its_truth(scene):
    est = registration(scene, TRUTH)
    assert est.source is U.Source.CORRELATED, est.error
    assert np.hypot(est.x - TRUTH[0], est.y - TRUTH[1]) < 5.0


def test_a_correlation_far_from_the_train_truth_is_no_registration(scene):
    """The truth 100 px off: the frame's true place is still in the correlation's radius and is found
    there, 100 px from the truth, beyond graph.fix_outlier_px: unmatched."""
    search, _ = scene
    assert search.s.graph.fix_outlier_px < 100
    est = registration(scene, (TRUTH[0] + 100, TRUTH[1]))
    assert est.source is U.Source.UNMATCHED and est.H is None
    assert "correlation far from the truth" in est.error


def test_a_view_is_never_larger_than_its_frame(scene):
    """A height far above the truth (a sweep's highest candidate) asks for the frame at several times its
    own size: the view stays at the frame's own resolution."""
    search, frame = scene
    high = U.Search(search.engine, search.s, U.Calibration.seed(20 * SCALE * FOCAL, (0.0, 0.0)))
    assert high.calib.expected_scale(frame) * search.engine.map_features.level > 2
    assert high.scale(frame) == 1.0
    assert high.view(frame, 0, U.Stopwatch()).size == SIZE


def test_locate_answers_with_a_confident_correlation_and_extracts_no_keypoint(scene, tmp_path, monkeypatch):
    """--mode locate at a known height: the correlation goes first, and its confident peak is the answer.
    No keypoint of the frame or the map is extracted (DISK on a CPU: seconds a window); the JSON says
    whose dense descriptors found it and at what heading."""
    search, frame = scene

    def no_keypoints(*_args):
        raise AssertionError("a keypoint extraction after a confident correlation")

    monkeypatch.setattr(U.LightGlueBackend, "extract", no_keypoints)
    u, v = frame.cx / frame.width, frame.cy / frame.height          # the truth point: the frame's centre
    query = U.LocateQuery(frame.path.parent / "map.png", frame.path, frame.fx, frame.fy, frame.cx, frame.cy,
                          (TRUTH[0] + 120, TRUTH[1] - 70), 250.0, (u, v), SCALE * FOCAL, yaw=HEADING)
    res = U.locate(search.s, query, tmp_path, log=U.quiet)
    assert res["source"] == "correlated" and res["matched"] and res["map_level"] is None
    assert np.hypot(res["x"] - TRUTH[0], res["y"] - TRUTH[1]) < 5.0
    assert abs(U.angle_diff(res["heading"], HEADING)) < 0.5 and res["backend"] == search.s.correlation.backend
    assert res["peak_ratio"] >= search.s.correlation.min_ratio and res["height_from"] == "given"
