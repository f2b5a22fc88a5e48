"""Tune mode: the search space from TOML, the block-wise split, best_params round trip, resumption,
and a study shared by several worker processes (journal file; a real throwaway PostgreSQL server)."""
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import optuna
import pytest

import uavloc as U
from conftest import ROOT


def test_search_space_is_read_from_toml_with_types(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[tune.space."geometry.min_inliers"]\nlow = 10\nhigh = 30\n'
                 '[tune.space."features.backend"]\nchoices = ["aliked", "xfeat"]\n')
    s = U.load_settings(str(f))
    space = U.search_space(s)
    assert space["geometry.min_inliers"] == {"low": 10, "high": 30}
    assert space["features.backend"]["choices"] == ("aliked", "xfeat")
    assert space["search.virtual_zoom"] == {"low": 0.8, "high": 1.25}      # settings.toml's own entries stay
    values = {k: s.value(k) for k in space}
    trial = optuna.trial.FixedTrial({**values, "geometry.min_inliers": 17, "features.backend": "xfeat"})
    params = U.suggest(trial, space, s)
    assert params["geometry.min_inliers"] == 17 and isinstance(params["geometry.min_inliers"], int)
    assert params["features.backend"] == "xfeat"
    assert s.with_values(params).geometry.min_inliers == 17 and s.geometry.min_inliers == 12


@pytest.mark.parametrize("table, words", [
    ('[tune.space."geometry.nope"]\nlow = 1\nhigh = 2\n', "'geometry.nope' is not a setting"),
    ('[tune.space."geometry.min_inliers"]\nlow = 5\nhigh = 5\n', "low < high"),
    ('[tune.space."features.backend"]\nchoices = []\n', "non-empty list"),
])
def test_bad_search_space_is_a_usage_error(table, words, tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(table)
    with pytest.raises(U.UsageError, match=words):
        U.search_space(U.load_settings(str(f)))


def test_tune_split_hides_blocks_and_keeps_a_holdout_apart():
    s = U.load_settings()
    train = [i for i in range(1, 120) if i % 7]          # gaps like test ids interleaved with train ids
    sp = U.tune_split(train, s)
    val = [i for b in sp.val_blocks for i in b]
    assert set(sp.fit) | set(val) | set(sp.holdout) == set(train)
    assert not (set(sp.fit) & set(val)) and not (set(sp.holdout) & (set(sp.fit) | set(val)))
    assert len(sp.holdout) == round(0.2 * len(train))
    for block in sp.val_blocks:                          # each block is consecutive in train order
        pos = [train.index(i) for i in block]
        assert pos == list(range(pos[0], pos[0] + len(pos)))
    assert sum(len(b) >= 2 for b in sp.val_blocks) >= len(sp.val_blocks) - 1
    assert U.tune_split(train, s) == sp                  # seeded: the same split every run


def test_best_params_round_trip_into_settings(tmp_path):
    params = {"features.match_threshold": 0.2143, "geometry.min_inliers": 26, "search.search_radius": 204.5}
    path = tmp_path / "best_params.toml"
    path.write_text(U.params_toml(params, "test"))
    s = U.load_settings(str(path))
    assert s.features.match_threshold == 0.2143 and s.geometry.min_inliers == 26
    assert s.search.search_radius == 204.5
    tuned = tomllib.loads(U.apply_params(U.DEFAULT_SETTINGS.read_text(), params))
    assert tuned["geometry"]["min_inliers"] == 26 and tuned["features"]["match_threshold"] == 0.2143
    assert tuned["features"]["backend"] == U.load_settings().features.backend   # the rest untouched


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")   # ask() without optimize: as a killed worker left it
def test_study_resumes_after_a_kill(tmp_path):
    s = U.load_settings(None, None, ["tune.storage=sqlite:///" + str(tmp_path / "t.db"), "tune.study=t"])
    space = U.search_space(s)

    def objective(trial):
        p = U.suggest(trial, space, s)
        return -abs(p["geometry.min_inliers"] - 20)

    study, _ = U.open_study(s, tmp_path, "fp")
    study.optimize(objective, n_trials=3)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = study.ask()                     # a trial left RUNNING by a worker process that is gone
    killed.set_user_attr("worker", f"{socket.gethostname()}:{int(dead.stdout)}")
    alive = study.ask()                      # ... and one a live worker on this machine is running
    alive.set_user_attr("worker", U.WORKER)
    first = [(t.number, t.params) for t in study.trials[:3]]
    assert first[0][1]["geometry.min_inliers"] == 12     # trial 0 is the base settings

    study, _ = U.open_study(s, tmp_path, "fp")
    states = [t.state for t in study.trials]
    assert states[3:] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING]
    study.tell(alive, -1.0)
    study.optimize(objective, n_trials=1)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 5 and [(t.number, t.params) for t in study.trials[:3]] == first
    assert len({tuple(sorted(t.params.items())) for t in done}) == 5     # no trial repeated
    with pytest.raises(U.UsageError, match="other data"):
        U.open_study(s, tmp_path, "another fingerprint")


# ------------------------------------------------------------------ several workers, one study

def run_workers(n: int, storage: str, data: Path, out: Path, trials: int) -> float:
    """`n` tune processes started together on one study, as on n machines; returns the wall time."""
    cmd = [sys.executable, str(ROOT / "uavloc.py"), "--mode", "tune", "--data", str(data), "--out", str(out),
           "--storage", storage, "--study", "shared", "--trials", str(trials), "--set", "features.backend=sift"]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(n)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    return time.perf_counter() - t0


def check_shared_study(storage, trials: int, workers: int) -> None:
    """Every trial complete (or pruned), numbered once, drawn once, and both workers ran some."""
    study = optuna.load_study(study_name="shared", storage=storage)
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                       optuna.trial.TrialState.PRUNED)]
    # the study stops at `trials`; two workers asking in the same instant may add one more
    assert trials <= len(finished) <= trials + workers - 1, [t.state for t in study.trials]
    assert len(study.trials) == len(finished)                       # nothing lost, failed or left running
    assert sorted(t.number for t in study.trials) == list(range(len(study.trials)))
    assert len({tuple(sorted(t.params.items())) for t in finished}) == len(finished)
    assert len({t.user_attrs["worker"] for t in finished}) == workers
    assert finished[0].params == {k: U.load_settings().value(k) for k in finished[0].params}   # trial 0: the base


def test_two_workers_share_a_journal_file_study(demo_data, tmp_path):
    journal = tmp_path / "study.journal"
    run_workers(2, f"journal:{journal}", demo_data, tmp_path / "out", trials=8)
    check_shared_study(U.open_storage(f"journal:{journal}"), trials=8, workers=2)
    best = tomllib.loads((tmp_path / "out" / "best_params.toml").read_text())
    assert set(best) <= {"features", "geometry", "search", "graph", "preprocess"} and best


def pg_bin() -> Path | None:
    """PostgreSQL's server programs: on PATH, or where Debian puts them."""
    found = shutil.which("pg_ctl") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))[::-1]), None)
    return Path(found).resolve().parent if found else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server in a temp folder on a free port, stopped and removed after.
    The server refuses to run as root; as root it runs as the `postgres` user."""
    bin_dir = pg_bin()
    if bin_dir is None:
        if os.environ.get("UAVLOC_TEST_POSTGRES") == "required":
            pytest.fail("PostgreSQL is not installed, and UAVLOC_TEST_POSTGRES=required (.ci/run installs it)")
        pytest.skip("PostgreSQL is not installed (.ci/run installs it with apt)")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="uavloc-pg-"))      # /tmp: the postgres user can reach it
    if as_user:
        shutil.chown(folder, "postgres")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pgdata = folder / "data"
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(pgdata), "-l", str(folder / "log"), "-w", "start",
                    "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(pgdata), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_a_postgresql_study(postgres_url, demo_data, tmp_path):
    run_workers(2, postgres_url, demo_data, tmp_path / "out", trials=8)
    check_shared_study(U.open_storage(postgres_url), trials=8, workers=2)
    best = tomllib.loads((tmp_path / "out" / "best_params.toml").read_text())
    assert set(best) <= {"features", "geometry", "search", "graph", "preprocess"} and best
