import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import uavloc  # noqa: E402

# the weights folder the module itself resolves ($UAVLOC_WEIGHTS, else run.weights_dir beside the project)
WEIGHTS = Path(uavloc.load_settings().run.weights_dir)
if not WEIGHTS.is_absolute():
    WEIGHTS = ROOT / WEIGHTS


def weights_present(backend: str) -> bool:
    return all((WEIGHTS / name).is_file() for name in uavloc.BACKENDS[backend].weight_files)


def backends_param(*names):
    """pytest params for backends: the learned ones carry the `weights` marker and skip without them."""
    return [pytest.param(n, marks=[] if not uavloc.BACKENDS[n].needs_torch else
                         [pytest.mark.weights, pytest.mark.skipif(not weights_present(n), reason=f"{n} weights absent")])
            for n in names]


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    return WEIGHTS


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small synthetic data set in the competition layout (the same generator as --mode demo)."""
    root = tmp_path_factory.mktemp("demo")
    return uavloc.make_demo(root, seed=3, n_frames=24)


@pytest.fixture(scope="session")
def solution(demo_data) -> pd.DataFrame:
    """The demo's test truths, indexed by id."""
    return uavloc.read_solution(demo_data.parent / "solution.csv").set_index("id")


def sift(*overrides: str) -> "uavloc.Settings":
    """Settings for a fast run without weights."""
    return uavloc.load_settings(overrides=["features.backend=sift", *overrides])


def run_cli(*args, env=None, script=ROOT / "uavloc.py", cwd=None):
    """A uavloc script as a user runs it: a subprocess, output captured."""
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=900)


def cli_env(**extra) -> dict:
    return {**os.environ, **extra}
