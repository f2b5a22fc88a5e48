import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import uavloc  # noqa: E402


def weights_present(backend: str) -> bool:
    folder = Path(os.environ.get("UAVLOC_WEIGHTS", ROOT / "weights"))
    return all((folder / name).is_file() for name in uavloc.WEIGHT_FILES[backend])


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small synthetic data set in the competition layout (the same generator as --mode demo)."""
    root = tmp_path_factory.mktemp("demo")
    return uavloc.make_demo(root, seed=3, n_frames=24)


def run_cli(*args, env=None):
    """uavloc.py as a user runs it: a subprocess, output captured."""
    return subprocess.run([sys.executable, str(ROOT / "uavloc.py"), *args], capture_output=True, text=True,
                          env=env, timeout=600)
