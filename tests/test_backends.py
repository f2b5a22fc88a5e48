"""Frames found on the map through each backend (learned ones skip themselves without weights): every
turn, far from the prior, and a frame that matches nowhere."""
import dataclasses

import cv2
import numpy as np
import pytest

import uavloc as U
from conftest import backends_param


@pytest.fixture(scope="module", params=backends_param("aliked", "xfeat", "disk", "sift"))
def calibrated(request, demo_data, tmp_path_factory):
    """One search per backend, calibrated once on the fixture's train frames (no fallback: each
    backend as it is)."""
    s = U.load_settings(overrides=[f"features.backend={request.param}", "features.fallback="])
    ds = U.load_dataset(demo_data)
    prep = U.prepare(s, ds, tmp_path_factory.mktemp(request.param), U.Checkpoint(None), U.Stopwatch(), log=U.quiet)
    return U.Search(prep.engine, prep.settings, prep.calibration(ds, ds.train_ids, log=U.quiet)), ds


def middle_test_frame(ds, solution):
    fid = int(solution.index[len(solution) // 2])
    return ds.frames[fid], solution.loc[fid, ["x_pixel", "y_pixel"]].to_numpy(float)


@pytest.mark.parametrize("turn", [0, 90, 180, 270])
def test_a_frame_is_found_at_every_turn_within_8px(calibrated, solution, turn, tmp_path):
    """The frame turned on disk by a multiple of 90 degrees (intrinsics and lean turned with it), no
    heading known: the view turned by each quarter turn finds it."""
    search, ds = calibrated
    frame, truth = middle_test_frame(ds, solution)
    img = U.read_image(frame.path, 1)
    k = turn // 90
    path = tmp_path / "turned.JPG"
    cv2.imwrite(str(path), np.ascontiguousarray(np.rot90(img, k)), [cv2.IMWRITE_JPEG_QUALITY, 95])
    _, m = U.rotate_image(img[..., 0], 90 * k)
    cx, cy = U.project(m, [frame.principal_point])[0]
    fx, fy = (frame.fx, frame.fy) if k % 2 == 0 else (frame.fy, frame.fx)
    w, h = (frame.width, frame.height) if k % 2 == 0 else (frame.height, frame.width)
    turned = U.Frame(frame.id, path, w, h, fx, fy, cx, cy, "test")
    ox, oy = search.calib.lean
    for _ in range(k):
        ox, oy = oy, -ox
    lean = U.Search(search.engine, search.s, dataclasses.replace(search.calib, lean=(ox, oy), pose=None))
    est, _ = lean.find(turned, truth + [60, -40], 150, None)
    assert est.H is not None, est.error
    # the demo camera's tilt jitters by 0.004 f per axis around the one lean the search uses: at k = 330
    # that moves a frame's nadir by 1.3 px (1-sigma) per axis, up to 5.6 px at 3 sigma, plus the match's own
    assert np.hypot(est.x - truth[0], est.y - truth[1]) < 8


def test_a_frame_far_from_every_quarter_turn_is_found_in_a_view_turned_to_its_heading(calibrated, solution,
                                                                                       tmp_path):
    """The frame turned on disk by 45 degrees (its empty corners black), its heading known: no quarter turn
    brings it within search.exact_turn_beyond of north-up, so its view is turned to the degree, and
    it is found as the frame itself is."""
    search, ds = calibrated
    frame, truth = middle_test_frame(ds, solution)
    upright, _ = search.find(frame, truth, 150, None)
    assert upright.H is not None, upright.error
    img = U.read_image(frame.path, 1)
    turned_img, m = U.rotate_image(img, 45)
    path = tmp_path / "turned45.JPG"
    cv2.imwrite(str(path), turned_img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    cx, cy = U.project(m, [frame.principal_point])[0]
    f = (frame.fx + frame.fy) / 2
    turned = U.Frame(frame.id, path, turned_img.shape[1], turned_img.shape[0], f, f, cx, cy, "test")
    heading = U.homography_yaw(upright.H @ np.linalg.inv(m), turned.principal_point)
    a = np.radians(-45)                      # the lean, in focal units, turns with the image
    ox, oy = search.calib.lean
    lean = (ox * np.cos(a) - oy * np.sin(a), ox * np.sin(a) + oy * np.cos(a))
    s45 = U.Search(search.engine, search.s, dataclasses.replace(search.calib, lean=lean, pose=None))
    assert U.turns_for(heading, search.s.search.exact_turn_beyond) == [round(-heading) % 360]
    est, _ = s45.find(turned, truth + [60, -40], 150, heading)
    assert est.H is not None and est.turn % 90 != 0, est.error
    assert np.hypot(est.x - truth[0], est.y - truth[1]) < 8


def test_frame_far_from_its_prior_is_relocalized(calibrated, solution):
    """A prior 700 px off with a 50 px radius: the widening search (radii, then tiles) finds the frame."""
    search, ds = calibrated
    frame, truth = middle_test_frame(ds, solution)
    far = (truth[0] + 700 if truth[0] < 900 else truth[0] - 700, truth[1])
    est, _ = search.find(frame, far, 50, None)
    assert est.source == U.Source.RELOCALIZED, est.error
    # the same bound as at every turn above: the demo camera's tilt jitter alone moves a nadir up to 5.6 px
    assert np.hypot(est.x - truth[0], est.y - truth[1]) < 8


@pytest.mark.parametrize("backend", backends_param("aliked", "xfeat", "disk"))
def test_learned_backends_load_without_touching_torch_hub(backend, weights_dir, monkeypatch, tmp_path):
    """Weights load from our folder: torch's hub folder is neither read nor changed, nothing is fetched."""
    import torch

    def no_global_state(*_a, **_k):
        raise AssertionError("torch.hub.set_dir changes process-wide state")

    monkeypatch.setattr(torch.hub, "set_dir", no_global_state)
    monkeypatch.setattr(U, "LOADED", {})                    # built here, not taken from an earlier test
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))     # a fetch would write here
    s = U.load_settings(overrides=[f"features.backend={backend}"], flags={"run.weights_dir": str(weights_dir)})
    b = U.build_backend(s)
    img = U.synthetic_map(320, 240, 1)[..., 1]
    f = b.extract(img)
    i0, i1, _ = b.match(f, (320, 240), f, (320, 240), b.threshold(s.features))
    assert len(f.keypoints) > 50 and len(i0) > 0.8 * len(f.keypoints) and np.mean(i0 == i1) > 0.95
    assert not (tmp_path / "empty-torch-home").exists()


def test_a_frame_that_matches_nowhere_gives_up_within_its_budget(calibrated):
    """A blank frame matches no window: with a zero budget the widening search tries no window at all,
    says so, and the frame is left unmatched."""
    search, ds = calibrated
    frame = ds.frames[ds.test_ids[0]]
    blank = frame.path.parent.parent / "blank.JPG"
    cv2.imwrite(str(blank), np.full((frame.height, frame.width), 128, np.uint8))
    f = dataclasses.replace(frame, path=blank)
    est, _ = search.find(f, search.engine.map_centre, 50.0, None, widen=True, budget_s=0.0)
    assert est.H is None and est.source is U.Source.UNMATCHED
    assert "search budget of 0.0s ran out after 0 widened windows" in est.error


@pytest.mark.parametrize("backend", backends_param("aliked", "xfeat", "disk", "sift"))
def test_matches_recover_a_known_homography(backend, weights_dir):
    """An image and its warp by a known homography (turned 7 degrees, scaled, a little perspective):
    the backend's matches give that homography back within a pixel over the overlap."""
    s = U.load_settings(overrides=[f"features.backend={backend}"], flags={"run.weights_dir": str(weights_dir)})
    b = U.build_backend(s)
    img = U.synthetic_map(640, 480, 5)[..., 1]
    H = np.array([[0.95, -0.12, 30], [0.12, 0.95, -20], [2e-5, -1e-5, 1]])
    warped = cv2.warpPerspective(img, H, (640, 480), flags=cv2.INTER_LINEAR)
    f0, f1 = b.extract(img), b.extract(warped)
    i0, i1, _ = b.match(f0, (640, 480), f1, (640, 480), b.threshold(s.features))
    found, inliers = U.estimate_homography(f0.keypoints[i0], f1.keypoints[i1], s.geometry)
    assert inliers.sum() > 100, inliers.sum()
    pts = np.array([(x, y) for x in range(120, 560, 40) for y in range(100, 400, 40)], float)
    err = np.hypot(*(U.project(found, pts) - U.project(H, pts)).T)
    assert err.max() < 1.0, err.max()


@pytest.mark.parametrize("backend", backends_param("aliked", "disk"))
def test_the_match_threshold_is_an_argument_of_the_call(backend, weights_dir):
    """One network, two thresholds: the stricter call keeps exactly the looser call's matches whose
    confidence lies above it (the threshold is not state of the shared network)."""
    s = U.load_settings(overrides=[f"features.backend={backend}"], flags={"run.weights_dir": str(weights_dir)})
    b = U.build_backend(s)
    img = U.synthetic_map(640, 480, 5)[..., 1]
    warped = cv2.warpAffine(img, cv2.getRotationMatrix2D((320, 240), 10, 1.0), (640, 480))
    f0, f1 = b.extract(img), b.extract(warped)
    loose = b.match(f0, (640, 480), f1, (640, 480), 0.05)
    strict = b.match(f0, (640, 480), f1, (640, 480), 0.6)
    assert 0 < len(strict[0]) < len(loose[0])
    keep = loose[2] > 0.6
    assert np.array_equal(strict[0], loose[0][keep]) and np.array_equal(strict[1], loose[1][keep])
    assert b.match(f0, (640, 480), f1, (640, 480), 0.05)[0].tolist() == loose[0].tolist()   # no state left behind


@pytest.mark.parametrize("backend", backends_param("aliked", "xfeat", "disk"))
def test_the_extractors_memory_layout_changes_no_feature(backend, weights_dir):
    """On CPU ALIKED and XFeat run in channels-last layout (faster there), DISK in the default one. Its
    extractor copied to the other layout finds the same keypoints and descriptors, up to float rounding."""
    import copy

    import torch
    s = U.load_settings(overrides=[f"features.backend={backend}"], flags={"run.weights_dir": str(weights_dir)})
    b = U.build_backend(s)
    built = b.extractor
    in_channels_last = next(p for p in built.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)
    assert in_channels_last == (b.channels_last and b.device.type == "cpu")
    img = U.synthetic_map(448, 336, 7)[..., 1]
    ours = b.extract(img)
    other = torch.contiguous_format if in_channels_last else torch.channels_last
    try:
        b.extractor = copy.deepcopy(built).to(memory_format=other)
        theirs = b.extract(img)
    finally:
        b.extractor = built
    d = np.hypot(*(ours.keypoints[:, None] - theirs.keypoints[None]).transpose(2, 0, 1))
    nearest = d.argmin(1)
    same = d[np.arange(len(d)), nearest] < 0.01
    assert len(ours.keypoints) > 200 and same.mean() > 0.98, same.mean()
    assert np.abs(ours.descriptors[same] - theirs.descriptors[nearest[same]]).max() < 1e-3
