"""The kaggle/ kernel folder: metadata fields, sync with uavloc.py, and an offline dry run in a fake /kaggle."""
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

import uavloc as U
from conftest import ROOT, WEIGHTS, run_cli, weights_present

KAGGLE = ROOT / "kaggle"


def test_kernel_metadata_has_the_documented_fields_and_types():
    meta = json.loads((KAGGLE / "kernel-metadata.json").read_text())
    user, _, slug = meta["id"].partition("/")
    assert user and slug and "/" not in slug
    assert isinstance(meta["title"], str) and slug == meta["title"].lower().replace(" ", "-")
    assert (KAGGLE / meta["code_file"]).is_file()
    assert meta["language"] in ("python", "r", "rmarkdown") and meta["kernel_type"] in ("script", "notebook")
    for key in ("is_private", "enable_gpu", "enable_internet"):
        assert isinstance(meta[key], bool)
    assert meta["enable_internet"] is False and meta["is_private"] is True
    for key in ("dataset_sources", "competition_sources", "kernel_sources", "model_sources"):
        assert isinstance(meta[key], list) and all(isinstance(v, str) for v in meta[key])
    assert len(meta["competition_sources"]) == 1 and len(meta["dataset_sources"]) == 2


def test_kaggle_folder_is_in_sync_with_uavloc_and_settings():
    hint = "kaggle/ is out of sync: run `python uavloc.py --mode kaggle-sync`"
    assert (KAGGLE / "uavloc.py").read_text() == U.kernel_source(U.DEFAULT_SETTINGS.read_text()), hint
    meta = json.loads((KAGGLE / "kernel-metadata.json").read_text())
    assert meta == U.kernel_metadata(U.load_settings().kaggle), hint


def fake_kaggle(tmp_path, demo_data, with_weights):
    """/kaggle/input/<competition>/ in the competition's layout (map.png under data/), optional weights."""
    root = tmp_path / "kaggle"
    comp = root / "input" / "gnss-denied-localization"
    shutil.copytree(demo_data, comp)
    (comp / "data").mkdir()
    shutil.move(comp / "map.png", comp / "data" / "map.png")
    if with_weights:
        w = root / "input" / "uavloc-weights"
        w.mkdir(parents=True)
        for name in U.BACKENDS["aliked"].weight_files:
            os.symlink(WEIGHTS / name, w / name)
    (root / "working").mkdir(parents=True)
    return root


def run_kernel(root, cwd, *flags):
    env = {k: v for k, v in os.environ.items() if k != "UAVLOC_WEIGHTS"}
    # no network: any download attempt fails at once instead of reaching the internet
    env.update(UAVLOC_KAGGLE_ROOT=str(root), HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               TORCH_HOME=str(cwd / "torch-home"))
    return run_cli(*flags, env=env, script=KAGGLE / "uavloc.py", cwd=cwd)


def check_submission(root, demo_data):
    sub = pd.read_csv(root / "working" / "submission.csv")
    ids = sorted(pd.read_csv(demo_data / "test_data/test_cam.csv")["id"])
    assert sub["id"].tolist() == ids
    m = U.metric(sub, U.read_solution(demo_data.parent / "solution.csv"))
    assert m["acc@25"] == 1.0


@pytest.mark.slow
def test_kernel_dry_run_in_a_simulated_kaggle(demo_data, tmp_path):
    root = fake_kaggle(tmp_path, demo_data, with_weights=False)
    r = run_kernel(root, tmp_path, "--set", "features.backend=sift")     # no weights dataset: SIFT
    assert r.returncode == 0, r.stderr
    assert "kaggle: data" in r.stdout and "Traceback" not in r.stderr
    check_submission(root, demo_data)


@pytest.mark.slow
@pytest.mark.weights
@pytest.mark.skipif(not weights_present("aliked"), reason="ALIKED weights absent")
def test_kernel_dry_run_without_flags_uses_the_weights_dataset(demo_data, tmp_path):
    root = fake_kaggle(tmp_path, demo_data, with_weights=True)
    r = run_kernel(root, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "uavloc-weights" in r.stdout
    check_submission(root, demo_data)


def test_missing_kornia_is_installed_offline_from_the_wheels(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kornia", None)           # import kornia -> ImportError
    monkeypatch.setitem(sys.modules, "kornia.feature", None)
    with pytest.raises(U.WeightsError, match="no kornia-\\*.whl wheel"):
        U.import_offline("kornia.feature", "kornia-*.whl", tmp_path / "empty")
    (tmp_path / "kornia-0.9.0-py3-none-any.whl").write_bytes(b"")
    calls = []
    monkeypatch.setattr(U.subprocess, "run", lambda cmd, **k: calls.append(cmd) or
                        subprocess.CompletedProcess(cmd, 1, "", "ERROR: no matching distribution"))
    with pytest.raises(U.WeightsError, match="offline install of kornia"):
        U.import_offline("kornia.feature", "kornia-*.whl", tmp_path)
    assert calls and "--no-index" in calls[0] and calls[0][calls[0].index("--find-links") + 1] == str(tmp_path)


def test_the_weights_dataset_holds_every_file_the_settings_may_load(tmp_path):
    """The backend's files, the fallback preset's (DISK: real imagery) and run.fetch_backends'; a missing
    one is a WeightsError naming it."""
    weights = tmp_path / "w"
    weights.mkdir()
    s = U.load_settings(flags={"run.weights_dir": str(weights)})
    expected = {n for b in ("aliked", "disk", "xfeat") for n in U.BACKENDS[b].weight_files}
    assert set(U.backends_in_use(s)) == {"aliked", "disk", "xfeat"}
    for n in expected - {"disk_lightglue.pth"}:
        (weights / n).write_bytes(b"w")
    with pytest.raises(U.WeightsError, match="disk_lightglue.pth"):
        U.weights_dataset(s, tmp_path / "ds")
    (weights / "disk_lightglue.pth").write_bytes(b"w")
    names = U.weights_dataset(s, tmp_path / "ds")
    assert set(names) == expected and all((tmp_path / "ds" / n).is_file() for n in expected)
    meta = json.loads((tmp_path / "ds" / "dataset-metadata.json").read_text())
    assert meta["id"] == s.kaggle.weights_dataset


@pytest.mark.slow
@pytest.mark.weights
@pytest.mark.skipif(not (weights_present("aliked") and weights_present("disk")), reason="ALIKED or DISK weights absent")
def test_the_kernel_loads_disk_from_the_weights_dataset_the_command_built(demo_data, solution, tmp_path):
    """The weights dataset as --mode kaggle-datasets builds it, in a simulated Kaggle: the kernel finds it
    and locates a frame with DISK from it (torch's hub folder empty, no network)."""
    root = fake_kaggle(tmp_path, demo_data, with_weights=False)
    U.weights_dataset(U.load_settings(flags={"run.weights_dir": str(WEIGHTS)}), root / "input" / "uavloc-weights")
    comp = root / "input" / "gnss-denied-localization"
    cam = pd.read_csv(comp / "test_data/test_cam.csv").iloc[0]
    truth = solution.loc[int(cam.id)]
    # the correlation off: a confident one would answer before any keypoint backend is loaded
    r = run_kernel(root, tmp_path, "--mode", "locate", "--set", "features.backend=disk", "--set",
                   "correlation.enabled=false", "--map",
                   str(comp / "data" / "map.png"), "--frame", str(comp / f"test_data/test_images/{int(cam.id):04d}.JPG"),
                   "--fx", str(cam.fx), "--fy", str(cam.fy), "--cx", str(cam.cx), "--cy", str(cam.cy),
                   "--prior", f"{truth.x_pixel + 40},{truth.y_pixel - 30}", "--altitude", "330", "--map-gsd", "1")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["backend"] == "disk" and res["matched"], res
    assert "uavloc-weights" in r.stdout or "uavloc-weights" in r.stderr
