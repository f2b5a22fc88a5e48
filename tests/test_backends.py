"""Localization of synthetic frames through each learned backend (skipped only without weights)."""
import cv2
import numpy as np
import pandas as pd
import pytest

import uavloc as U
from conftest import weights_present


@pytest.fixture(scope="module", params=["aliked", "xfeat", "sift"])
def calibrated(request, demo_data, tmp_path_factory):
    """One localizer per backend, calibrated once on the fixture's train frames."""
    backend = request.param
    if backend != "sift" and not weights_present(backend):
        pytest.skip(f"{backend} weights absent")
    s = U.load_settings(None, None, [f"features.backend={backend}"])
    ds = U.load_dataset(demo_data)
    loc = U.build_localizer(s, ds, U.weights_dir(s, None), tmp_path_factory.mktemp(backend), log=lambda *a: None)
    registered = U.register_train(loc, ds, U.Checkpoint(None))
    U.fit_calibration(loc, ds, registered, ds.train_ids, log=lambda *a: None)
    return loc, ds


@pytest.mark.weights
@pytest.mark.parametrize("yaw_offset", [0, 90, 180, 270])
def test_fixture_frame_localizes_within_5px(calibrated, demo_data, yaw_offset, tmp_path):
    loc, ds = calibrated
    sol = pd.read_csv(demo_data.parent / "solution.csv").set_index("id")
    fid = int(sol.index[len(sol) // 2])
    frame = ds.frames[fid]
    truth = sol.loc[fid, ["x_pixel", "y_pixel"]].to_numpy(float)
    # rotate the frame on disk by a multiple of 90 deg (intrinsics rotate with it)
    img = U.read_image(frame.path, 1)
    k = yaw_offset // 90
    rot = np.ascontiguousarray(np.rot90(img, k))
    path = tmp_path / "rotated.JPG"
    cv2.imwrite(str(path), rot, [cv2.IMWRITE_JPEG_QUALITY, 95])
    h, w = img.shape[:2]
    _, m = U.rotate_image(img[..., 0], 90 * k)
    cx, cy = U.project(m, [(frame.cx, frame.cy)])[0]
    fx, fy = (frame.fx, frame.fy) if k % 2 == 0 else (frame.fy, frame.fx)
    rotated = U.Frame(fid, path, fx, fy, cx, cy, "test")
    # the lean is along image-up of the original frame: rotate the learned offset with the image
    ox, oy = loc.calib.ref_offset
    for _ in range(k):
        ox, oy = oy, -ox
    calib = loc.calib
    loc.calib = U.dataclasses.replace(calib, ref_offset=(ox, oy))
    try:
        est, _ = loc.locate(rotated, truth + [60, -40], 150, None)
    finally:
        loc.calib = calib
    assert est.H is not None, est.error
    assert np.hypot(est.x - truth[0], est.y - truth[1]) < 5


@pytest.mark.weights
def test_frame_far_from_its_prior_is_relocalized(calibrated, demo_data):
    """A prior 700 px off with a 50 px radius: the widening search (radii, then tiles) finds the frame."""
    loc, ds = calibrated
    sol = pd.read_csv(demo_data.parent / "solution.csv").set_index("id")
    fid = int(sol.index[len(sol) // 2])
    truth = sol.loc[fid, ["x_pixel", "y_pixel"]].to_numpy(float)
    far = (truth[0] + 700 if truth[0] < 900 else truth[0] - 700, truth[1])
    est, _ = loc.locate(ds.frames[fid], far, 50, None)
    assert est.source == "relocalized", est.error
    assert np.hypot(est.x - truth[0], est.y - truth[1]) < 5
