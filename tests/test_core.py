import json

import numpy as np
import pandas as pd
import pytest

import uavloc as U
from conftest import run_cli


def test_metric_hand_computed():
    truth = pd.DataFrame({"id": [1, 2, 3, 4], "x_pixel": [0, 0, 0, 0], "y_pixel": [0, 0, 0, 0]})
    pred = pd.DataFrame({"id": [1, 2, 3], "x_pixel": [10, 100, 400], "y_pixel": [0, 0, 300]})
    m = U.metric(pred, truth)   # distances 10, 100, 500, missing
    assert m["acc@25"] == 0.25 and m["acc@125"] == 0.5 and m["acc@500"] == 0.75
    assert abs(m["score"] - 50.0) < 1e-9


def test_settings_override_order(tmp_path):
    user = tmp_path / "user.toml"
    user.write_text('[features]\nbackend = "xfeat"\nmax_keypoints = 500\n')
    s = U.load_settings(str(user), None, ["features.max_keypoints=700"])
    assert s["features"]["backend"] == "xfeat" and s["features"]["max_keypoints"] == 700
    s = U.load_settings(str(user), "reference", [])
    assert s["reference"]["mode"] == "centre" and s["features"]["backend"] == "xfeat"
    with pytest.raises(U.UsageError, match="unknown setting"):
        U.load_settings(None, None, ["features.nope=1"])
    with pytest.raises(U.UsageError, match="number"):
        U.load_settings(None, None, ["features.max_keypoints=abc"])


def test_settings_round_trip_through_toml(tmp_path):
    s = U.load_settings()
    s["geometry"]["ransac_threshold"] = 2.5
    p = tmp_path / "s.toml"
    p.write_text(U.dump_toml(s))
    assert U.load_settings(str(p)) == s


def test_processing_order_below_first_train_goes_backwards():
    order = U.processing_order(list(range(1, 13)) + [20], list(range(13, 20)), both_ends=False)
    assert order[:12] == list(range(12, 0, -1)) and order[-1] == 20


def test_both_ends_order_alternates_from_the_two_known_ends():
    order = U.processing_order([11, 12, 13, 14, 15, 16], [10, 17], both_ends=True)
    assert order[:2] == [11, 16] and set(order[2:4]) == {12, 15}


def test_block_split_hides_runs_not_single_ids():
    ids = list(range(100))
    hidden = U.block_split(ids, 0.25, 3, 5, seed=1)
    assert 20 <= len(hidden) <= 25 and 0 not in hidden and 99 not in hidden
    runs = np.split(np.array(hidden), np.flatnonzero(np.diff(hidden) > 1) + 1)
    assert all(len(r) >= 2 for r in runs[:-1])
    assert hidden == U.block_split(ids, 0.25, 3, 5, seed=1)


def test_jump_is_rejected_and_interpolated():
    known = {i: U.Estimate(i, 10.0 * i, 0.0, "truth") for i in (1, 5)}
    H = np.eye(3)
    done = {i: U.Estimate(i, 10.0 * i, 0.0, "map", H=H) for i in (2, 3, 4)}
    done[3].x, done[3].y = 900.0, 700.0      # a wrong match far away
    U.reject_jumps(done, known, bound=12.0, slack=5.0)
    assert done[3].source == "interpolated" and done[2].source == "map"
    U.fill_unmatched(done, known, (0, 0))
    assert abs(done[3].x - 30.0) < 1e-9 and abs(done[3].y) < 1e-9


def test_atomic_write_leaves_no_partial_file(tmp_path):
    p = tmp_path / "a.csv"
    U.atomic_write(p, "id\n1\n")
    assert p.read_text() == "id\n1\n" and len(list(tmp_path.iterdir())) == 1


def test_superpoint_loads_magicleap_layout_and_gives_256d(tmp_path):
    torch = pytest.importorskip("torch")
    net = U.superpoint_net()
    keys = set(net.state_dict())
    assert {"conv1a.weight", "convPb.weight", "convDb.weight"} <= keys
    torch.save(net.state_dict(), tmp_path / "superpoint_v1.pth")
    fresh = U.superpoint_net()
    fresh.load_state_dict(torch.load(tmp_path / "superpoint_v1.pth", weights_only=True))
    prob, desc = fresh(torch.rand(1, 1, 64, 96))
    assert prob.shape == (1, 64, 96) and desc.shape == (1, 256, 8, 12)


def test_submit_sift_writes_valid_submission_and_locate_json(demo_data, tmp_path):
    out = tmp_path / "o"
    r = run_cli("--mode", "submit", "--data", str(demo_data), "--out", str(out), "--set", "features.backend=sift")
    assert r.returncode == 0, r.stderr
    sub = pd.read_csv(out / "submission.csv")
    test_ids = pd.read_csv(demo_data / "test_data/test_cam.csv")["id"].tolist()
    assert list(sub.columns) == ["id", "x_pixel", "y_pixel"] and sub["id"].tolist() == sorted(test_ids)
    m = U.metric(sub, pd.read_csv(demo_data.parent / "solution.csv"))
    assert m["acc@25"] == 1.0 and m["mean_px"] < 5
    diag = pd.read_csv(out / "test_predictions.csv").set_index("id")
    assert {"anchor_id", "inliers", "rotation", "source", "runtime_s", "stages"} <= set(diag.columns)
    # the run 12..14 lies between train frames 11 and 15: it is anchored from both ends
    assert diag.loc[12, "anchor_id"] == 11 and diag.loc[14, "anchor_id"] == 15
    # the truth is the demo's leaning camera's nadir: 0.06 f below the image centre, about 20 map px
    # from the centre's projection; the learned reference pixel puts predictions within 5 px of it
    calib = json.loads((out / "calibration.json").read_text())
    assert abs(calib["ref_offset"][1] - 0.06) < 0.005 and abs(calib["ref_offset"][0]) < 0.005
    assert calib["ref_offset"][1] * calib["k"] > 15
    err = np.hypot(*(sub.set_index("id")[["x_pixel", "y_pixel"]] -
                     pd.read_csv(demo_data.parent / "solution.csv").set_index("id")).to_numpy().T)
    assert err.max() < 5
    assert (out / "report" / "map_overview.png").is_file()
    cam = pd.read_csv(demo_data / "test_data/test_cam.csv").iloc[0]
    sol = pd.read_csv(demo_data.parent / "solution.csv").set_index("id").loc[int(cam.id)]
    frame = demo_data / f"test_data/test_images/{int(cam.id):04d}.JPG"
    r = run_cli("--mode", "locate", "--map", str(demo_data / "map.png"), "--frame", str(frame),
                "--fx", str(cam.fx), "--fy", str(cam.fy), "--cx", str(cam.cx), "--cy", str(cam.cy),
                "--prior", f"{sol.x_pixel + 40},{sol.y_pixel - 30}", "--out", str(out),
                "--set", "features.backend=sift")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert np.hypot(res["x"] - sol.x_pixel, res["y"] - sol.y_pixel) < 5   # calibrated reference pixel reused


def test_prefetched_decode_equals_direct_decode_and_keeps_errors(demo_data, tmp_path):
    frames = sorted((demo_data / "train_data/train_images").iterdir())[:3]
    dec = U.FrameDecoder(prefetch=True, keep=2)
    for p in frames:
        dec.prefetch(p, 200)
    assert np.array_equal(dec.get(frames[2], 200), U.load_gray(frames[2], 200))
    assert len(dec.items) == 2                      # bounded: the oldest entry is dropped
    bad = tmp_path / "bad.JPG"
    bad.write_bytes(b"\xff\xd8 not really a jpeg \xff\xd9")
    dec.prefetch(bad, 200)
    with pytest.raises(U.DataError, match="bad.JPG"):
        dec.get(bad, 200)
