"""Localization of synthetic frames through each backend (learned ones skip themselves without weights)."""
import dataclasses

import cv2
import numpy as np
import pytest

import uavloc as U
from conftest import backends_param


@pytest.fixture(scope="module", params=backends_param("aliked", "xfeat", "sift"))
def calibrated(request, demo_data, tmp_path_factory):
    """One search per backend, calibrated once on the fixture's train frames."""
    s = U.load_settings(overrides=[f"features.backend={request.param}"])
    ds = U.load_dataset(demo_data)
    s, engine, reg = U.prepare(s, ds, tmp_path_factory.mktemp(request.param), U.Checkpoint(None), log=U.quiet)
    calib = U.fit_calibration(reg.matched(ds, ds.train_ids), len(ds.train_ids), reg.height, s.reference, log=U.quiet)
    return U.Search(engine, s, calib), ds


def middle_test_frame(ds, solution):
    fid = int(solution.index[len(solution) // 2])
    return ds.frames[fid], solution.loc[fid, ["x_pixel", "y_pixel"]].to_numpy(float)


@pytest.mark.parametrize("yaw_offset", [0, 90, 180, 270])
def test_fixture_frame_localizes_within_5px(calibrated, solution, yaw_offset, tmp_path):
    search, ds = calibrated
    frame, truth = middle_test_frame(ds, solution)
    # rotate the frame on disk by a multiple of 90 deg (intrinsics rotate with it)
    img = U.read_image(frame.path, 1)
    k = yaw_offset // 90
    path = tmp_path / "rotated.JPG"
    cv2.imwrite(str(path), np.ascontiguousarray(np.rot90(img, k)), [cv2.IMWRITE_JPEG_QUALITY, 95])
    _, m = U.rotate_image(img[..., 0], 90 * k)
    cx, cy = U.project(m, [frame.principal_point])[0]
    fx, fy = (frame.fx, frame.fy) if k % 2 == 0 else (frame.fy, frame.fx)
    w, h = (frame.width, frame.height) if k % 2 == 0 else (frame.height, frame.width)
    rotated = U.Frame(frame.id, path, w, h, fx, fy, cx, cy, "test")
    # the lean is along image-up of the original frame: rotate the learned offset with the image
    ox, oy = search.calib.ref_offset
    for _ in range(k):
        ox, oy = oy, -ox
    turned = U.Search(search.engine, search.s, dataclasses.replace(search.calib, ref_offset=(ox, oy)))
    est, _ = turned.locate(rotated, truth + [60, -40], 150, None)
    assert est.H is not None, est.error
    assert np.hypot(est.x - truth[0], est.y - truth[1]) < 5


def test_frame_far_from_its_prior_is_relocalized(calibrated, solution):
    """A prior 700 px off with a 50 px radius: the widening search (radii, then tiles) finds the frame."""
    search, ds = calibrated
    frame, truth = middle_test_frame(ds, solution)
    far = (truth[0] + 700 if truth[0] < 900 else truth[0] - 700, truth[1])
    est, _ = search.locate(frame, far, 50, None)
    assert est.source == U.Source.RELOCALIZED, est.error
    assert np.hypot(est.x - truth[0], est.y - truth[1]) < 5


@pytest.mark.parametrize("backend", backends_param("aliked", "xfeat"))
def test_learned_backends_load_without_touching_torch_hub(backend, weights_dir, monkeypatch, tmp_path):
    """Weights load from our folder: torch's hub folder is neither read nor changed, nothing is fetched."""
    import torch

    def no_global_state(*_a, **_k):
        raise AssertionError("torch.hub.set_dir changes process-wide state")

    monkeypatch.setattr(torch.hub, "set_dir", no_global_state)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))     # a fetch would write here
    s = U.load_settings(overrides=[f"features.backend={backend}"], flags={"run.weights_dir": str(weights_dir)})
    b = U.build_backend(s)
    img = U.synthetic_map(320, 240, 1)[..., 1]
    f = b.extract(img)
    i0, i1, _ = b.match(f, (320, 240), f, (320, 240), s.features)
    assert len(f.keypoints) > 50 and len(i0) > 0.8 * len(f.keypoints) and np.mean(i0 == i1) > 0.95
    assert not (tmp_path / "empty-torch-home").exists()


def test_a_frame_that_matches_nowhere_gives_up_within_its_budget(calibrated):
    """A blank frame matches no window: with a zero budget the widening search stops at once, says so,
    and the frame is left unmatched (the sequence fills it)."""
    search, ds = calibrated
    frame = ds.frames[ds.test_ids[0]]
    blank = frame.path.parent.parent / "blank.JPG"
    cv2.imwrite(str(blank), np.full((frame.height, frame.width), 128, np.uint8))
    f = dataclasses.replace(frame, path=blank)
    est, _ = search.locate(f, search.engine.map_centre, 50.0, None, widen=True, budget_s=0.0)
    assert est.H is None and "budget" in est.error and est.runtime < 5
