"""Bad inputs get one clear error (file, row or id, problem) and an exit code; runs resume; frames that
raise are recorded; two runs give identical submissions."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import uavloc as U
from conftest import ROOT, WEIGHTS, run_cli, weights_present


def edit_csv(path, fn):
    """fn edits the table in place, or returns a new one."""
    df = pd.read_csv(path)
    new = fn(df)
    (df if new is None else new).to_csv(path, index=False)


def first_image(data, split):
    return sorted((data / f"{split}_data/{split}_images").iterdir())[0]


def set_cell(rel, column, value, row=0):
    def mutate(data):
        def fn(df):
            df[column] = df[column].astype(object)
            df.loc[row, column] = value
        edit_csv(data / rel, fn)
    return mutate


def truncate(split):
    def mutate(data):
        p = first_image(data, split)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return mutate


CAM = "train_data/train_cam.csv"
POS = "train_data/train_pos.csv"
TEST = "test_data/test_cam.csv"
CASES = {
    # name: (mutation of a copy of the fixture, exit code, words the message must hold)
    "no data folder": (lambda d: shutil.rmtree(d), 3, ["data folder not found"]),
    "no map": (lambda d: (d / "map.png").unlink(), 3, ["map.png not found"]),
    "no train images folder": (lambda d: shutil.rmtree(d / "train_data/train_images"), 3, ["train_images", "not found"]),
    "no test csv": (lambda d: (d / TEST).unlink(), 3, ["test_cam.csv", "not found"]),
    "empty csv file": (lambda d: (d / POS).write_text(""), 3, ["train_pos.csv", "not a readable CSV"]),
    "missing column": (lambda d: edit_csv(d / CAM, lambda df: df.drop(columns="fx")), 3,
                       ["train_cam.csv", "missing column", "fx"]),
    "NaN intrinsic": (set_cell(TEST, "fy", np.nan, row=1), 3, ["test_cam.csv", "'fy'", "line 3"]),
    "non-numeric value": (set_cell(CAM, "cx", "abc", row=2), 3, ["train_cam.csv", "'cx'", "line 4"]),
    "duplicate id": (lambda d: edit_csv(d / TEST, lambda df: df.loc.__setitem__((1, "id"), df.loc[0, "id"])), 3,
                     ["test_cam.csv", "duplicate id"]),
    "train id without position": (lambda d: edit_csv(d / POS, lambda df: df.drop(index=3)), 3,
                                  ["train_pos.csv", "has no position"]),
    "position without intrinsics": (lambda d: edit_csv(d / CAM, lambda df: df.drop(index=3)), 3,
                                    ["train_pos.csv", "no intrinsics"]),
    "train id without image": (lambda d: first_image(d, "train").unlink(), 3, ["no image for train id"]),
    "test id without image": (lambda d: first_image(d, "test").unlink(), 3, ["no image for test id"]),
    "truncated image": (truncate("test"), 3, ["truncated image", ".JPG"]),
    "corrupt image": (lambda d: first_image(d, "train").write_bytes(b"\0" * 500), 3, ["not a JPG or PNG"]),
    "empty test set": (lambda d: (d / TEST).write_text("id,fx,fy,cx,cy\n"), 3, ["empty test set"]),
    "zero focal length": (set_cell(CAM, "fx", 0.0), 3, ["train_cam.csv", "non-positive focal length"]),
    "negative focal length": (set_cell(TEST, "fy", -5.0), 3, ["test_cam.csv", "non-positive focal length"]),
    "id in train and test": (lambda d: edit_csv(d / TEST, lambda df: df.loc.__setitem__(
        (0, "id"), int(pd.read_csv(d / CAM)["id"].iloc[0]))), 3, ["both a train and a test id"]),
    "map too small": (lambda d: cv2.imwrite(str(d / "map.png"), np.full((30, 40), 128, np.uint8)), 3,
                      ["map.png", "too small"]),
    "train truth off the map": (set_cell(POS, "x_pixel", 999999.0, row=2), 3,
                                ["train_pos.csv", "line 4", "off the", "map"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_error(name, demo_data, tmp_path, capsys):
    mutate, code, words = CASES[name]
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    mutate(data)
    rc = U.main(["--mode", "validate", "--data", str(data), "--out", str(tmp_path / "o"),
                 "--set", "features.backend=sift"])
    err = capsys.readouterr().err
    assert rc == code, err
    assert err.startswith("uavloc: error:") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "o" / "submission.csv").exists()


def test_missing_weights_name_the_file_and_the_places(demo_data, tmp_path, capsys):
    rc = U.main(["--mode", "submit", "--data", str(demo_data), "--out", str(tmp_path / "o"),
                 "--weights", str(tmp_path / "nowhere"), "--set", "features.backend=aliked"])
    err = capsys.readouterr().err
    assert rc == 4 and "aliked-n16.pth" in err and err.count(str(tmp_path / "nowhere")) == 1, err


def test_wrong_weights_file_is_a_weights_error(demo_data, tmp_path, capsys, recwarn):
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "aliked-n16.pth").write_bytes(b"not a torch file")
    (weights / "aliked_lightglue.pth").write_bytes(b"not a torch file")
    rc = U.main(["--mode", "submit", "--data", str(demo_data), "--out", str(tmp_path / "o"),
                 "--weights", str(weights), "--set", "features.backend=aliked"])
    err = capsys.readouterr().err
    assert rc == 4 and "not a loadable weights file" in err and "aliked-n16.pth" in err
    assert not [w for w in recwarn if "fetching" in str(w.message)]      # nothing was downloaded


@pytest.mark.weights
@pytest.mark.skipif(not weights_present("aliked"), reason="ALIKED weights absent")
def test_weights_of_the_wrong_shape_are_a_weights_error(demo_data, tmp_path, capsys):
    import torch
    weights = tmp_path / "w"
    weights.mkdir()
    shutil.copy(WEIGHTS / "aliked_lightglue.pth", weights)
    torch.save({"conv1.weight": torch.zeros(3, 3)}, weights / "aliked-n16.pth")   # loads, wrong layout
    rc = U.main(["--mode", "submit", "--data", str(demo_data), "--out", str(tmp_path / "o"),
                 "--weights", str(weights), "--set", "features.backend=aliked"])
    err = capsys.readouterr().err
    assert rc == 4 and "do not load" in err, err


@pytest.mark.parametrize("argv, words", [
    (["--set", "features.nope=1"], "unknown setting 'features.nope'"),
    (["--set", "geometry.min_inliers=many"], "takes a number"),
    (["--preset", "turbo"], "unknown preset 'turbo'"),
    (["--mode", "report"], "--mode report needs --id"),
])
def test_usage_errors_exit_2(argv, words, demo_data, tmp_path, capsys):
    rc = U.main(["--data", str(demo_data), "--out", str(tmp_path / "o")] + argv)
    err = capsys.readouterr().err
    assert rc == 2 and words in err, err


def test_cli_error_prints_no_traceback(demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    truncate("train")(data)
    r = run_cli("--data", str(data), "--out", str(tmp_path / "o"))
    assert r.returncode == 3 and "truncated image" in r.stderr and "Traceback" not in r.stderr


def submit_cmd(data, out, *extra):
    return [sys.executable, str(ROOT / "uavloc.py"), "--mode", "submit", "--data", str(data), "--out", str(out),
            "--set", "features.backend=sift", "--set", "report.enabled=false", *extra]


@pytest.mark.slow
def test_killed_run_resumes_and_equals_an_uninterrupted_run(demo_data, tmp_path):
    full = subprocess.run(submit_cmd(demo_data, tmp_path / "full"), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(submit_cmd(demo_data, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt_dir = out / "checkpoints"
    deadline = time.time() + 300
    lines = 0
    while time.time() < deadline and proc.poll() is None:
        files = list(ckpt_dir.glob("*.jsonl")) if ckpt_dir.is_dir() else []
        lines = len(files[0].read_text().splitlines()) if files else 0
        if lines >= 25:            # the backend choice, the height, the train registrations, some frames after
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "submission.csv").exists()
    again = subprocess.run(submit_cmd(demo_data, out), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    replayed = int(again.stdout.split("checkpoint: ")[1].split()[0])
    assert replayed >= lines - 1           # the last line may have been cut by the kill
    assert (out / "submission.csv").read_bytes() == (tmp_path / "full" / "submission.csv").read_bytes()
    fresh = subprocess.run(submit_cmd(demo_data, out, "--fresh"), capture_output=True, text=True, timeout=600)
    assert "checkpoint: 0 results replayed" in fresh.stdout
    assert (out / "submission.csv").read_bytes() == (tmp_path / "full" / "submission.csv").read_bytes()


def test_frame_that_raises_is_recorded_and_strict_stops(demo_data, tmp_path, monkeypatch, capsys):
    victim = int(pd.read_csv(demo_data / "test_data/test_cam.csv")["id"].iloc[-1])
    real = U.Search.find

    def flaky(self, frame, *a, **k):
        if frame.id == victim:
            raise ZeroDivisionError("injected")
        return real(self, frame, *a, **k)

    monkeypatch.setattr(U.Search, "find", flaky)
    base = ["--data", str(demo_data), "--set", "features.backend=sift", "--set", "report.enabled=false",
            "--set", "run.validate=false"]
    assert U.main(["--out", str(tmp_path / "a")] + base) == 0
    failed = pd.read_csv(tmp_path / "a" / "failed_frames.csv")
    assert failed["id"].tolist() == [victim] and "ZeroDivisionError: injected" in failed["error"].iloc[0]
    sub = pd.read_csv(tmp_path / "a" / "submission.csv")
    assert victim in sub["id"].tolist() and np.isfinite(sub[["x_pixel", "y_pixel"]].to_numpy()).all()
    pred = pd.read_csv(tmp_path / "a" / "test_predictions.csv").set_index("id")
    # no map fix of its own: the pose graph places it by its links
    assert pred.loc[victim, "fix"] == "none" and pred.loc[victim, "source"] in ("chain", "interpolated")
    capsys.readouterr()
    assert U.main(["--out", str(tmp_path / "b"), "--strict"] + base) == 5
    err = capsys.readouterr().err
    assert f"frame {victim}" in err and "ZeroDivisionError: injected" in err and "--strict" in err
    assert not (tmp_path / "b" / "submission.csv").exists()


def test_invalid_submission_is_never_written(demo_data, tmp_path):
    ds = U.load_dataset(demo_data)
    ids = ds.test_ids
    good = pd.DataFrame({"id": ids, "x_pixel": 10.0, "y_pixel": 10.0})
    U.validate_submission(good, ds, (100, 100))
    for bad in (good.iloc[1:], pd.concat([good, good.iloc[:1]]), good.assign(x_pixel=np.nan),
                good.assign(y_pixel=-1.0), good.assign(x_pixel=1e6)):
        with pytest.raises(U.UavlocError):
            U.validate_submission(bad, ds, (100, 100))


def test_a_submission_that_fails_its_check_writes_nothing(demo_data, tmp_path, monkeypatch, capsys):
    """The submission is checked before any file of the test phase is written: when the check fails,
    the run exits with the error and the submission of an earlier run stays as it was."""
    def refuse(sub, dataset, map_size):
        raise U.UavlocError("internal error: the submission does not hold every test id exactly once")

    monkeypatch.setattr(U, "validate_submission", refuse)
    out = tmp_path / "o"
    out.mkdir()
    (out / "submission.csv").write_text("earlier\n")
    rc = U.main(["--data", str(demo_data), "--out", str(out), "--set", "features.backend=sift",
                 "--set", "run.validate=false"])
    assert rc == 1 and "does not hold every test id" in capsys.readouterr().err
    assert (out / "submission.csv").read_text() == "earlier\n" and not (out / "test_predictions.csv").exists()


# ----------------------------------------------------------------------------- what real data sets look like

def spaced_csvs(data):
    """Every CSV rewritten as `id, fx, fy` with a space after each comma and around headers."""
    for rel in (CAM, POS, TEST):
        df = pd.read_csv(data / rel)
        lines = [", ".join(f" {c}" for c in df.columns)] + [", ".join(f"{v} " for v in row) for row in df.astype(str).values]
        (data / rel).write_text("\n".join(lines) + "\n")


def lower_case_jpg(data):
    for p in (data / "test_data/test_images").iterdir():
        p.rename(p.with_name(p.stem + ".jpg"))


def extra_and_reordered_columns(data):
    edit_csv(data / CAM, lambda df: df[["cy", "cx", "id", "fy", "fx"]].assign(model="FC8482"))


def gray_map(data):
    cv2.imwrite(str(data / "map.png"), cv2.imread(str(data / "map.png"), cv2.IMREAD_GRAYSCALE))


def png_under_jpg_name(data):
    p = first_image(data, "train")
    cv2.imwrite(str(p.with_suffix(".png")), cv2.imread(str(p)))
    p.with_suffix(".png").rename(p)


DATA_CASES = {
    # name: (mutation, None if accepted else the words of the error)
    "spaces around headers and values": (spaced_csvs, None),
    "lower-case .jpg": (lower_case_jpg, None),
    "extra and reordered columns": (extra_and_reordered_columns, None),
    "grayscale map.png": (gray_map, None),
    "a PNG saved under a .JPG name": (png_under_jpg_name, None),
    "a test id that is also a train id": (CASES["id in train and test"][0], ["both a train and a test id"]),
    "an empty test set": (CASES["empty test set"][0], ["empty test set"]),
    "a fractional id": (set_cell(TEST, "id", 3.5), ["test_cam.csv", "ids must be integers"]),
    "a negative focal length": (CASES["negative focal length"][0], ["non-positive focal length"]),
    "a train truth off the map": (CASES["train truth off the map"][0], ["train_pos.csv", "id", "off the"]),
}


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_load_dataset_accepts_or_refuses_clearly(name, demo_data, tmp_path):
    mutate, words = DATA_CASES[name]
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    mutate(data)
    if words is None:
        ds = U.load_dataset(data)
        ref = U.load_dataset(demo_data)
        assert ds.train_ids == ref.train_ids and ds.test_ids == ref.test_ids
        for i, f in ref.frames.items():
            g = ds.frames[i]
            assert (g.fx, g.fy, g.cx, g.cy, g.truth, g.size) == (f.fx, f.fy, f.cx, f.cy, f.truth, f.size)
    else:
        with pytest.raises(U.DataError) as e:
            U.load_dataset(data)
        assert all(w in str(e.value) for w in words), str(e.value)


def test_a_truth_far_from_its_match_is_reported_and_left_out_of_the_fits():
    """Eight train frames whose homographies put the truth point on their truth, but one truth is 300
    px off (a wrong GPS row): it is named in the log and the fit ignores it."""
    matched = []
    for i in range(8):
        s = 0.5 + 0.01 * i
        H = np.array([[s, 0, 100.0 + 50 * i], [0, s, 200.0], [0, 0, 1]])
        truth = tuple(U.project(H, [(320, 240 + 0.06 * 600)])[0] + ([300, 0] if i == 5 else [0, 0]))
        matched.append((U.Frame(i, Path(f"{i}.JPG"), 640, 480, 600.0, 600.0, 320.0, 240.0, "train", truth), H))
    lines = []
    cfg = U.load_settings().truth
    calib = U.fit_calibration(matched, 8, U.Height(300.0, 0.0, U.HeightSource.GIVEN), cfg,
                              ((0.0, 0.0), U.LeanSource.DEFAULT), log=lines.append)
    assert any("id 5 (" in line and "left out" in line for line in lines), lines
    assert "7/8 train frames registered and used" in lines[-1]
    assert abs(calib.lean[1] - 0.06) < 1e-6 and abs(calib.lean[0]) < 1e-6
