#!/usr/bin/env python3
"""uavloc: find where each drone photo was taken on one large orthophoto map.

Sections, in the order data flows: config, data, preprocessing, features/matching,
geometry, calibration, localization, metric, tuning, reports, then the jobs behind the modes
(runs, demo data, kaggle) and the CLI.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import warnings
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

MODULE_FILE = Path(__file__).resolve()
ROOT = MODULE_FILE.parent
DEFAULT_SETTINGS = ROOT / "settings.toml"
# The Kaggle kernel is this file with settings.toml written into the next line by --mode kaggle-sync
# (a script kernel uploads one file); None here, where settings.toml sits beside the module.
EMBEDDED_SETTINGS = '# uavloc settings: every default lives here.\n# Override with `--settings FILE` (a TOML file with any subset of these keys),\n# `--preset NAME` (a [presets.NAME] table below) and `--set section.key=value` (repeatable).\n# Order: this file < --settings < --preset < --set.\n\n[run]\ndata = "build/demo/data"     # competition layout: map.png, train_data/, test_data/\nout = "build"                # every output goes under here\nweights_dir = "weights"      # overridden by $UAVLOC_WEIGHTS and by --weights\nwheels_dir = "wheels"        # kornia wheels installed offline (pip --no-index) when kornia is missing\ndevice = "auto"              # auto (CUDA when present) | cpu | cuda\nthreads = 0                  # torch CPU threads; 0 = all cores\nstrict = false               # stop at the first frame that raises, instead of recording it (--strict)\nresume = true                # replay finished frames of an interrupted run with the same data and settings\nvalidate = true              # submit also scores a block validation split of the train frames\nfeature_cache = true         # keep query features on disk under <out>/cache/query/\nprefetch = true              # decode the next frame in a background thread while this one is matched\n\n[split]\n# Validation mimics the test layout: blocks of consecutive train ids are hidden.\nval_fraction = 0.25\nblock_min = 2\nblock_max = 6\nseed = 0\n\n[preprocess]\nmax_side = 1400              # working size of a frame before scaling to the map\ngray = true\nedge_blend = false           # seed\'s Canny blend; off: it destroys matches at the true scale\ncanny_low = 50\ncanny_high = 150\nedge_kernel = 3\ngray_weight = 0.70\nedge_weight = 0.30\n\n[features]\nbackend = "aliked"           # aliked | xfeat | superpoint | sift\nmax_keypoints = 1024         # per query image\nmap_level = 0.5              # resolution the map is matched at, as a fraction of map.png\nmap_level_xfeat = 1.0        # the same for XFeat, which detects on a 1/8-resolution grid\nmap_tile = 768               # map features are extracted once, in tiles of this side\nmap_keypoints_per_tile = 1536\nmax_map_keypoints = 2048     # map keypoints handed to the matcher for one search window\nmatch_threshold = 0.1        # LightGlue match confidence (SIFT: Lowe ratio is sift_ratio)\nsift_ratio = 0.85\nhalf_precision = true        # on CUDA only\nquery_scale_step = 1.044     # query scales snap to powers of this, so features are reused across runs\n\n[geometry]\nransac_threshold = 3.0       # MAGSAC threshold in match-level px\nransac_confidence = 0.999\nransac_max_iters = 5000\nmin_inliers = 12             # a homography with fewer inliers is rejected\nmax_anisotropy = 1.4         # ratio of the homography\'s singular values at the frame centre\n\n[scale]\nncc_candidates = 40          # log-spaced scale candidates for the template-NCC calibration\nncc_template = 96            # template width in px for NCC\nncc_min_footprint = 0.02     # candidate range: frame width covers this ... \nncc_max_footprint = 0.9      # ... to this fraction of the map\'s smaller side\nclip_low = 0.67              # a match\'s scale must lie in [low, high] x the frame\'s expected scale\nclip_high = 1.5\nvirtual_zoom = 1.0           # query scale relative to the map level (< 1 zooms out)\ncrop_factor = 1.5            # search window = frame footprint x crop_factor (+ search radius)\n\n[reference]\n# The GPS truth is the camera\'s nadir; the camera leans, so it is not the image centre.\n# calibrated: one image point learned from the registered train frames (robust median)\n# pose: per frame, the nadir from the homography and the intrinsics, kept near the train frames\' nadirs\n# auto: pose where it predicts the registered train truths better than the fixed point | centre\nmode = "auto"\nmin_frames = 3               # fewer registered frames than this: fall back to the centre\npose_clip = 1.0              # a frame\'s nadir offset is kept within this many spreads of the train frames\'\n\n[localize]\nrotation_search = "prior"    # prior: order hypotheses by the heading prior | all | none\nrotation_step = 90.0         # degrees between rotation hypotheses\nmax_hypotheses = 4\nstrong_inliers = 50          # stop trying hypotheses / sources once this many inliers\nsearch_radius = 80.0         # map px added to the window for an adjacent anchor ...\nradius_per_id = 60.0         # ... plus this per id of gap to it\nmax_radius = 1200.0\nboth_ends = true             # resolve test runs from both bracketing known frames\nneighbour_matching = true    # match to the registered neighbour frame, compose homographies\nrelocalize = true            # widen the search when a frame fails\nrelocalize_growth = 2.5\nrelocalize_levels = 2        # widenings around the anchor before the known area, then the whole map\nsequence_check = true        # reject implausible jumps and fill by interpolation\nspeed_margin = 1.5           # speed bound = margin x 95th percentile of train speeds (px per id)\njump_slack = 60.0            # map px always allowed on top of the speed bound\n\n[report]\nworst_frames = 4             # matches_<id>.png for this many worst validation frames\nenabled = true\n\n[tune]\ntrials = 30\nstudy = "uavloc"\nstorage = ""                 # default: sqlite under <out>/tune/\nsampler_seed = 0\nholdout_fraction = 0.2       # train frames the study never sees\npruner_p = 0.1               # WilcoxonPruner p-threshold: prune a trial clearly worse than the best\ntie_break = 0.01             # objective = score - this x mean error px: breaks ties, never outweighs a threshold\n\n# Search space: one table per parameter; `low`/`high` (log = true for log-uniform) or `choices`.\n[tune.space."features.match_threshold"]\nlow = 0.02\nhigh = 0.4\nlog = true\n[tune.space."geometry.ransac_threshold"]\nlow = 1.0\nhigh = 8.0\nlog = true\n[tune.space."geometry.min_inliers"]\nlow = 8\nhigh = 40\n[tune.space."scale.virtual_zoom"]\nlow = 0.7\nhigh = 1.3\n[tune.space."scale.crop_factor"]\nlow = 1.1\nhigh = 2.5\n[tune.space."scale.clip_low"]\nlow = 0.4\nhigh = 0.9\n[tune.space."scale.clip_high"]\nlow = 1.1\nhigh = 2.5\n[tune.space."localize.search_radius"]\nlow = 30.0\nhigh = 300.0\nlog = true\n[tune.space."localize.speed_margin"]\nlow = 1.1\nhigh = 3.0\n[tune.space."localize.strong_inliers"]\nlow = 20\nhigh = 150\nlog = true\n[tune.space."localize.rotation_search"]\nchoices = ["prior", "all"]\n[tune.space."localize.relocalize_growth"]\nlow = 1.5\nhigh = 4.0\n[tune.space."localize.jump_slack"]\nlow = 20.0\nhigh = 200.0\nlog = true\n# Backend and keypoint budget are tunable too; each distinct value extracts the map and the\n# queries again, so a study over them costs a full run per value. Uncomment to include them:\n# [tune.space."features.backend"]\n# choices = ["aliked", "xfeat"]\n# [tune.space."features.max_keypoints"]\n# choices = [512, 1024, 2048]\n\n[kaggle]\nroot = "/kaggle"             # a Kaggle kernel is detected by <root>/input ($UAVLOC_KAGGLE_ROOT overrides)\nkernel_id = "your-kaggle-username/uavloc-submit"\nkernel_title = "uavloc submit"\ncompetition = "gnss-denied-localization"\nweights_dataset = "your-kaggle-username/uavloc-weights"\nwheels_dataset = "your-kaggle-username/uavloc-wheels"\npython_version = "3.11"      # Kaggle\'s Python, for the wheels dataset\nwheels = ["kornia==0.9.0", "kornia_rs==0.2.0"]   # kornia and its dependency that Kaggle lacks\n\n# The seed notebook\'s logic: north-up frames, one anchor (the previous frame), the image\n# centre as the truth, no relocalization and no sequence consistency.\n[presets.reference]\n"reference.mode" = "centre"\n"localize.rotation_search" = "none"\n"localize.both_ends" = false\n"localize.neighbour_matching" = false\n"localize.relocalize" = false\n"localize.sequence_check" = false\n\n# XFeat + LighterGlue (matched against the map at features.map_level_xfeat)\n[presets.fast]\n"features.backend" = "xfeat"\n'


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


def set_dotted(settings: dict, key: str, value) -> None:
    section, _, name = key.partition(".")
    if not name or section not in settings or not isinstance(settings[section], dict):
        raise UsageError(f"unknown setting '{key}' (use section.key, e.g. features.backend)")
    if name not in settings[section]:
        raise UsageError(f"unknown setting '{key}': [{section}] has {sorted(settings[section])}")
    old = settings[section][name]
    if isinstance(old, bool) and not isinstance(value, bool):
        raise UsageError(f"setting '{key}' takes true or false, not {value!r}")
    if isinstance(old, (int, float)) and not isinstance(old, bool):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UsageError(f"setting '{key}' takes a number, not {value!r}")
        value = float(value) if isinstance(old, float) else value
    settings[section][name] = value


def merge_settings(base: dict, extra: dict, origin: str) -> dict:
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


def load_settings(settings_file: str | None = None, preset: str | None = None,
                  overrides: list[str] = ()) -> dict:
    """TOML defaults < --settings FILE < --preset NAME < --set key=value."""
    settings = tomllib.loads(default_settings_text())
    if settings_file:
        merge_settings(settings, load_toml(Path(settings_file)), settings_file)
    if preset:
        presets = settings.get("presets", {})
        if preset not in presets:
            raise UsageError(f"unknown preset '{preset}'; settings.toml has {sorted(presets)}")
        for k, v in presets[preset].items():
            set_dotted(settings, k, v)
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq:
            raise UsageError(f"--set takes key=value, got '{item}'")
        set_dotted(settings, key.strip(), parse_value(text.strip()))
    return settings


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


def dump_toml(settings: dict) -> str:
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

    for section, body in settings.items():
        table(section, body)
    return "\n".join(lines)


def digest(obj, n: int = 12) -> str:
    """A short stable hash of a JSON-able object: the key of caches and checkpoints."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temp file beside `path`, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)            # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- data

@dataclass
class Frame:
    id: int
    path: Path
    fx: float
    fy: float
    cx: float
    cy: float
    split: str                    # "train" | "test"
    truth: tuple[float, float] | None = None


@dataclass
class Dataset:
    root: Path
    map_path: Path
    frames: dict[int, Frame]

    @property
    def train_ids(self) -> list[int]:
        return sorted(i for i, f in self.frames.items() if f.split == "train")

    @property
    def test_ids(self) -> list[int]:
        return sorted(i for i, f in self.frames.items() if f.split == "test")


def read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path)
    except Exception as e:  # pandas raises several types for unreadable CSVs
        raise DataError(f"{path}: not a readable CSV ({e})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    df = df[columns]
    for c in columns:
        values = pd.to_numeric(df[c], errors="coerce")
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
            check_image_file(path)
            truth = positions.get(fid) if split == "train" else None
            if split == "train" and truth is None:
                raise DataError(f"{root / 'train_data/train_pos.csv'}: train id {fid} has no position")
            frames[fid] = Frame(fid, path, float(r.fx), float(r.fy), float(r.cx), float(r.cy), split, truth)
    extra = sorted(set(positions) - {i for i, f in frames.items() if f.split == "train"})
    if extra:
        raise DataError(f"{root / 'train_data/train_pos.csv'}: id {extra[0]} has a position but no intrinsics")
    map_path = follow_pointer(map_path)
    check_image_file(map_path)
    w, h = image_size(map_path)
    if min(w, h) < MIN_MAP_SIDE:
        raise DataError(f"{map_path}: map is {w}x{h} px, too small for any frame (need at least {MIN_MAP_SIDE} px a side)")
    return Dataset(root, map_path, frames)


MIN_MAP_SIDE = 64


def check_image_file(path: Path) -> None:
    """Cheap up-front check that an image is complete: the header parses and the end marker is there
    (a truncated JPG still decodes, silently grey at the bottom, so decoding alone would not tell)."""
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
        image_size(path)
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


@functools.lru_cache(maxsize=4096)
def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, read once per path: every search attempt asks for it."""
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
    """Hide blocks of consecutive ids (as the test set hides them), never the first or last id."""
    rng = np.random.default_rng(seed)
    n_target = int(round(fraction * len(ids)))
    hidden: set[int] = set()
    for _ in range(1000):
        if len(hidden) >= n_target:
            break
        size = int(rng.integers(block_min, block_max + 1))
        start = int(rng.integers(1, max(2, len(ids) - size)))
        block = ids[start:start + size]
        # keep one known frame between blocks so each block stays a separate run
        if any(i in hidden for i in ids[max(0, start - 1):start + size + 1]):
            continue
        hidden.update(block[:n_target - len(hidden)])
    return sorted(hidden)


# ----------------------------------------------------------------------------- preprocessing

def reduced_flag(full_side: int, target_side: int) -> int:
    """The coarsest IMREAD_REDUCED_GRAYSCALE_* that still yields at least target_side."""
    for factor, flag in ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
                         (2, cv2.IMREAD_REDUCED_GRAYSCALE_2)):
        if full_side // factor >= target_side:
            return flag
    return cv2.IMREAD_GRAYSCALE


def load_gray(path: Path, target_side: int) -> np.ndarray:
    """Decode at reduced size where the target allows it, then resize so max side = target_side."""
    w, h = image_size(path)
    img = read_image(path, reduced_flag(max(w, h), target_side))
    scale = target_side / max(img.shape)
    if abs(scale - 1) > 1e-6:
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return img


def preprocess(gray: np.ndarray, p: dict) -> np.ndarray:
    """Optional seed-style Canny edge blend; off by default (it kills matches at the true scale)."""
    if not p["edge_blend"]:
        return gray
    edges = cv2.Canny(gray, p["canny_low"], p["canny_high"])
    edges = cv2.dilate(edges, np.ones((p["edge_kernel"],) * 2, np.uint8))
    return cv2.addWeighted(gray, p["gray_weight"], edges, p["edge_weight"], 0)


# ----------------------------------------------------------------------------- features/matching

@dataclass
class Features:
    keypoints: np.ndarray      # (N, 2) float32, x y in the image the features came from
    descriptors: np.ndarray    # (N, D) float32
    scores: np.ndarray         # (N,) float32

    def subset(self, index) -> "Features":
        return Features(self.keypoints[index], self.descriptors[index], self.scores[index])


# file name in the weights dir -> name kornia expects in torch's hub cache (MANIFEST.md)
WEIGHT_FILES = {
    "aliked": {"aliked-n16.pth": "aliked-n16.pth", "aliked_lightglue.pth": "aliked_lightglue_v0-1_arxiv-pth"},
    "xfeat": {"xfeat.pt": "xfeat.pt", "xfeat-lighterglue.pt": "xfeat-lighterglue.pt"},
    "superpoint": {"superpoint_v1.pth": "superpoint_v1.pth",
                   "superpoint_lightglue.pth": "superpoint_lightglue_v0-1_arxiv-pth"},
    "sift": {},
}


def find_weight(weights_dir: Path, name: str, cache_name: str) -> Path:
    import torch
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    places = [weights_dir / name, weights_dir / cache_name, hub / cache_name]
    for p in places:
        if p.is_file():
            return p
    raise WeightsError(
        f"weights file '{name}' not found; looked in: {', '.join(str(p) for p in places)}. "
        f"Put it in the weights dir (setting run.weights_dir, $UAVLOC_WEIGHTS or --weights); "
        f"see README 'Weights' (kornia downloads it where a network is available).")


def pick_device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("run.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def superpoint_net():
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


class Matcher:
    """One interface for every backend: extract(image) -> Features; match(f0, size0, f1, size1)."""

    def __init__(self, cfg: dict, weights_dir: Path, device_name: str = "auto", wheels_dir: Path = Path("wheels")):
        self.backend = cfg["backend"]
        if self.backend not in WEIGHT_FILES:
            raise UsageError(f"features.backend must be one of {sorted(WEIGHT_FILES)}, not '{self.backend}'")
        self.cfg = cfg
        self.device = pick_device(device_name) if self.backend != "sift" else None
        self.half = bool(cfg["half_precision"]) and self.device is not None and self.device.type == "cuda"
        if self.backend == "sift":
            self.sift = cv2.SIFT_create(nfeatures=0)
        else:
            self._load_networks(Path(weights_dir), Path(wheels_dir))

    def _load_networks(self, weights_dir: Path, wheels_dir: Path) -> None:
        import torch
        KF = import_kornia_feature(wheels_dir)
        files = {name: find_weight(weights_dir, name, cache) for name, cache in WEIGHT_FILES[self.backend].items()}
        for path in files.values():
            # kornia re-downloads a cached file it cannot load: check each one here so nothing is fetched
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise WeightsError(f"{path}: not a loadable weights file for backend '{self.backend}' "
                                   f"({type(e).__name__}: {str(e).strip().splitlines()[0][:120]})") from None
        # kornia loads from torch's hub cache: stage our files there under its names, in a private dir
        hub = Path(tempfile.mkdtemp(prefix="uavloc-hub-"))
        (hub / "checkpoints").mkdir()
        for name, path in files.items():
            target = hub / "checkpoints" / WEIGHT_FILES[self.backend][name]
            try:
                target.symlink_to(path.resolve())
            except OSError:
                target.write_bytes(path.read_bytes())
        old_hub = torch.hub.get_dir()
        torch.hub.set_dir(str(hub))
        try:
            if self.backend == "aliked":
                self.extractor = KF.ALIKED.from_pretrained("aliked-n16", max_num_keypoints=self.cfg["max_keypoints"],
                                                           detection_threshold=0.0)
                self.lightglue = KF.LightGlue("aliked", filter_threshold=self.cfg["match_threshold"])
            elif self.backend == "xfeat":
                self.extractor = KF.XFeat.from_pretrained(top_k=self.cfg["max_keypoints"], detection_threshold=0.05)
                self.lightglue = KF.LightGlue("xfeat", filter_threshold=self.cfg["match_threshold"])
            else:
                self.extractor = superpoint_net()
                state = torch.load(files["superpoint_v1.pth"], map_location="cpu", weights_only=True)
                self.extractor.load_state_dict(state)
                self.lightglue = KF.LightGlue("superpoint", filter_threshold=self.cfg["match_threshold"])
        except Exception as e:  # torch.load and load_state_dict raise many types for a wrong file
            names = ", ".join(str(f) for f in files.values())
            raise WeightsError(f"weights for backend '{self.backend}' do not load from {names} "
                               f"(wrong or corrupt file?): {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}") \
                from None
        finally:
            torch.hub.set_dir(old_hub)
        self.extractor = self.extractor.eval().to(self.device)
        self.lightglue = self.lightglue.eval().to(self.device)

    # --- extraction
    def extract(self, image: np.ndarray, max_keypoints: int | None = None) -> Features:
        """image: uint8 gray (H, W). Keypoints in that image's pixel coordinates."""
        k = max_keypoints or self.cfg["max_keypoints"]
        if self.backend == "sift":
            return self._extract_sift(image, k)
        import torch
        x = torch.from_numpy(image).to(self.device).float().div(255)[None, None]
        with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=self.half):
            if self.backend == "aliked":
                self.extractor.max_num_keypoints = k
                r = self.extractor(x.expand(1, 3, -1, -1))[0]
                kp, desc, sc = r.keypoints, r.descriptors, r.keypoint_scores
            elif self.backend == "xfeat":
                r = self.extractor.detectAndCompute(x, top_k=k)[0]
                kp, desc, sc = r["keypoints"], r["descriptors"], r["scores"]
            else:
                kp, desc, sc = self._superpoint(x, k)
        return Features(kp.float().cpu().numpy(), desc.float().cpu().numpy(), sc.float().cpu().numpy())

    def _superpoint(self, x, k, threshold: float = 0.005, nms: int = 4):
        import torch
        prob, dense = self.extractor(x)
        prob = prob[0]
        peak = torch.nn.functional.max_pool2d(prob[None], nms * 2 + 1, 1, nms)[0] == prob
        ys, xs = torch.nonzero(peak & (prob > threshold), as_tuple=True)
        sc = prob[ys, xs]
        order = torch.argsort(sc, descending=True)[:k]
        kp = torch.stack([xs[order], ys[order]], 1).float()
        h, w = prob.shape
        grid = (kp + 0.5) / torch.tensor([w, h], device=kp.device) * 2 - 1
        desc = torch.nn.functional.grid_sample(dense, grid[None, None], align_corners=False)[0, :, 0].T
        return kp, torch.nn.functional.normalize(desc, dim=1), sc[order]

    def _extract_sift(self, image: np.ndarray, k: int) -> Features:
        kps, desc = self.sift.detectAndCompute(image, None)
        if desc is None or not kps:
            return Features(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), np.zeros(0, np.float32))
        resp = np.array([p.response for p in kps], np.float32)
        order = np.argsort(-resp, kind="stable")[:k]
        pts = np.array([p.pt for p in kps], np.float32)[order]
        return Features(pts, desc[order].astype(np.float32), resp[order])

    # --- matching
    def match(self, f0: Features, size0: tuple[int, int], f1: Features, size1: tuple[int, int],
              threshold: float):
        """Returns (idx0, idx1, confidence) of putative matches with confidence above `threshold`
        (LightGlue; SIFT uses its ratio test); sizes are (width, height)."""
        if len(f0.keypoints) < 2 or len(f1.keypoints) < 2:
            return np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32)
        if self.backend == "sift":
            return self._match_sift(f0, f1)
        import torch
        dev = self.device

        def side(f, size):
            return {"keypoints": torch.from_numpy(f.keypoints).to(dev)[None],
                    "descriptors": torch.from_numpy(f.descriptors).to(dev)[None],
                    "image_size": torch.tensor([size], dtype=torch.float32, device=dev)}

        with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=self.half):
            self.lightglue.conf.filter_threshold = threshold   # per call: tuning trials share one matcher
            out = self.lightglue({"image0": side(f0, size0), "image1": side(f1, size1)})
        m = out["matches"][0].cpu().numpy()
        conf = out["scores"][0].float().cpu().numpy()
        return m[:, 0], m[:, 1], conf

    def _match_sift(self, f0: Features, f1: Features):
        bf = cv2.BFMatcher(cv2.NORM_L2)
        fwd = bf.knnMatch(f0.descriptors, f1.descriptors, k=2)
        back = {m.queryIdx: m.trainIdx for m in bf.match(f1.descriptors, f0.descriptors)}
        keep = [(a.queryIdx, a.trainIdx, 1 - a.distance / max(b.distance, 1e-6)) for a, b in
                (p for p in fwd if len(p) == 2)
                if a.distance < self.cfg["sift_ratio"] * b.distance and back.get(a.trainIdx) == a.queryIdx]
        if not keep:
            return np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32)
        k = np.array(keep)
        return k[:, 0].astype(int), k[:, 1].astype(int), k[:, 2].astype(np.float32)


@dataclass
class MapFeatures:
    """Map keypoints extracted once, at `level` x map.png resolution, selected per search window."""
    level: float
    size: tuple[int, int]     # (width, height) at level
    features: Features

    def window(self, x0: float, y0: float, x1: float, y1: float, limit: int) -> tuple[Features, np.ndarray]:
        """Keypoints inside a window given in map-level px; returns them relative to the window origin."""
        kp = self.features.keypoints
        inside = np.flatnonzero((kp[:, 0] >= x0) & (kp[:, 0] < x1) & (kp[:, 1] >= y0) & (kp[:, 1] < y1))
        if len(inside) > limit:
            inside = inside[np.argsort(-self.features.scores[inside], kind="stable")[:limit]]
        sub = self.features.subset(inside)
        sub.keypoints = sub.keypoints - np.array([x0, y0], np.float32)
        return sub, inside


def map_level(cfg: dict) -> float:
    """The resolution the map is matched at: XFeat detects on a 1/8-resolution grid and needs more pixels."""
    return cfg["map_level_xfeat"] if cfg["backend"] == "xfeat" else cfg["map_level"]


def extract_map_features(map_gray: np.ndarray, matcher: Matcher, cfg: dict) -> MapFeatures:
    """Tile the map (with overlap for context), keep each tile's keypoints from its core only."""
    level = map_level(cfg)
    img = cv2.resize(map_gray, None, fx=level, fy=level, interpolation=cv2.INTER_AREA) if level != 1 else map_gray
    h, w = img.shape
    tile, pad = cfg["map_tile"], 32
    parts = []
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            ox, oy = max(0, x - pad), max(0, y - pad)
            crop = img[oy:min(h, y + tile + pad), ox:min(w, x + tile + pad)]
            if crop.std() < 1:          # blank (no-data) area of the map
                continue
            f = matcher.extract(crop, cfg["map_keypoints_per_tile"])
            f.keypoints = f.keypoints + np.array([ox, oy], np.float32)
            kp = f.keypoints
            core = (kp[:, 0] >= x) & (kp[:, 0] < x + tile) & (kp[:, 1] >= y) & (kp[:, 1] < y + tile)
            parts.append(f.subset(core))
    if not parts:
        raise DataError("map.png is blank: no features can be extracted")
    feats = Features(*(np.concatenate([getattr(p, a) for p in parts]) for a in ("keypoints", "descriptors", "scores")))
    return MapFeatures(level, (w, h), feats)


def cached_map_features(map_path: Path, map_gray: np.ndarray, matcher: Matcher, settings: dict,
                        cache_dir: Path) -> tuple[MapFeatures, bool]:
    """Disk cache keyed by the map file and every setting that changes the map's features."""
    stat = map_path.stat()
    key = digest([str(map_path.resolve()), stat.st_size, stat.st_mtime_ns, settings["preprocess"],
                  {k: settings["features"][k] for k in ("backend", "map_tile", "map_keypoints_per_tile")},
                  map_level(settings["features"]),
                  str(matcher.device or "cpu")], 16)
    path = cache_dir / f"map_{key}.npz"
    if path.is_file():
        z = np.load(path)
        return MapFeatures(float(z["level"]), tuple(int(v) for v in z["size"]),
                           Features(z["keypoints"], z["descriptors"], z["scores"])), True
    mf = extract_map_features(preprocess(map_gray, settings["preprocess"]), matcher, settings["features"])
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".map_{key}.tmp.npz"
    np.savez(tmp, level=mf.level, size=np.array(mf.size), keypoints=mf.features.keypoints,
             descriptors=mf.features.descriptors, scores=mf.features.scores)
    os.replace(tmp, path)
    return mf, False


class FrameDecoder:
    """Frames decoded at working size: a small explicit cache (a frame's rotation hypotheses share one
    decode) and one background thread that decodes the next frame while this one is matched
    (cv2.imread releases the GIL; a 48-megapixel JPG costs about as much as matching it)."""

    def __init__(self, prefetch: bool, keep: int = 4):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="uavloc-decode") if prefetch else None
        self.items: OrderedDict[tuple, np.ndarray | Future] = OrderedDict()
        self.keep = keep

    def prefetch(self, path: Path, side: int) -> None:
        if self.pool is not None and (path, side) not in self.items:
            self._store((path, side), self.pool.submit(load_gray, path, side))

    def get(self, path: Path, side: int) -> np.ndarray:
        item = self.items.get((path, side))
        if item is None:
            item = load_gray(path, side)
        elif isinstance(item, Future):
            item = item.result()          # an error in the thread (a corrupt image) is raised here
        self._store((path, side), item)
        return item

    def _store(self, key: tuple, item) -> None:
        self.items[key] = item
        self.items.move_to_end(key)
        while len(self.items) > self.keep:
            self.items.popitem(last=False)


@dataclass
class QueryView:
    """A frame's features at one rotation and scale, in the coordinates of that rotated view."""
    features: Features
    size: tuple[int, int]            # (w, h) of the rotated working image
    to_view: np.ndarray              # original image px -> view px


class QueryCache:
    """Explicit cache of query views: in memory, and on disk under <out>/cache/query/<key>/ so a second
    run or a tuning trial skips decoding and extraction. The key holds everything that changes the
    features: the image file (path, size, mtime), rotation, scale, preprocessing and backend."""

    def __init__(self, folder: Path | None, settings: dict, device: str):
        f = settings["features"]
        self.folder = folder / digest([settings["preprocess"], f["backend"], device, f["max_keypoints"],
                                       f["half_precision"]]) if folder else None
        self.memory: dict[str, QueryView] = {}
        self.hits = self.misses = 0

    def key(self, path: Path, rotation: float, scale: float) -> str:
        st = path.stat()
        return digest([str(path.resolve()), st.st_size, st.st_mtime_ns, round(rotation, 3), round(scale, 6)], 20)

    def _file(self, key: str) -> Path | None:
        return self.folder / f"{key}.npz" if self.folder is not None else None

    def has(self, key: str) -> bool:
        return key in self.memory or (self.folder is not None and self._file(key).is_file())

    def get(self, key: str) -> QueryView | None:
        v = self.memory.get(key)
        if v is None and self.folder is not None and self._file(key).is_file():
            z = np.load(self._file(key))
            v = QueryView(Features(z["keypoints"], z["descriptors"], z["scores"]),
                          (int(z["size"][0]), int(z["size"][1])), z["to_view"])
            self.memory[key] = v
        self.hits += v is not None
        self.misses += v is None
        return v

    def put(self, key: str, v: QueryView) -> None:
        self.memory[key] = v
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{key}.tmp.npz"
        np.savez(tmp, keypoints=v.features.keypoints, descriptors=v.features.descriptors,
                 scores=v.features.scores, size=np.array(v.size), to_view=v.to_view)
        os.replace(tmp, self._file(key))


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
    K = np.array([[frame.fx, 0, frame.cx], [0, frame.fy, frame.cy], [0, 0, 1.0]])
    nadir = camera_nadir(H, K)
    if nadir is None:
        return None
    return normalized_offset(project(np.linalg.inv(H), [nadir])[0], frame)


def estimate_homography(p0: np.ndarray, p1: np.ndarray, g: dict) -> tuple[np.ndarray | None, np.ndarray]:
    if len(p0) < 4:
        return None, np.zeros(len(p0), bool)
    H, mask = cv2.findHomography(p0.astype(np.float32), p1.astype(np.float32), cv2.USAC_MAGSAC,
                                 g["ransac_threshold"], maxIters=g["ransac_max_iters"],
                                 confidence=g["ransac_confidence"])
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


# ----------------------------------------------------------------------------- calibration

@dataclass
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


@dataclass
class Calibration:
    """Height model (k = map px per image px x fx, i.e. altitude in map px) and the truth's image point:
    one fixed point (ref_offset), or per frame from its pose (pose) when that fits the train frames better."""
    k_ncc: float
    k: float
    k_spread: float
    ref_offset: tuple[float, float]          # ((u - cx) / fx, (v - cy) / fy) of the GPS truth
    ref_spread: tuple[float, float]
    n_registered: int
    pose: PoseModel | None = None

    @classmethod
    def from_ncc(cls, k_ncc: float) -> "Calibration":
        """Before registration: the NCC height model, the image centre as the truth."""
        return cls(k_ncc, k_ncc, 0.0, (0.0, 0.0), (0.0, 0.0), 0)

    def expected_scale(self, frame: Frame) -> float:
        return self.k / np.sqrt(frame.fx * frame.fy)

    def ref_pixel(self, frame: Frame, H: np.ndarray | None = None) -> tuple[float, float]:
        """The image point of the GPS truth: from the frame's pose where the pose model is in use."""
        o = self.pose.offset(H, frame) if self.pose is not None and H is not None else None
        o = o or self.ref_offset
        return frame.cx + frame.fx * o[0], frame.cy + frame.fy * o[1]


def ncc_scale(frame: Frame, map_gray: np.ndarray, cfg: dict) -> tuple[float, float]:
    """Seed's template NCC over log-spaced scale candidates derived from the data, 4 rotations.
    Returns (map px per image px, best NCC)."""
    w, h = image_size(frame.path)
    side = min(map_gray.shape)
    lo, hi = cfg["ncc_min_footprint"] * side / w, cfg["ncc_max_footprint"] * side / w
    tw = cfg["ncc_template"]
    small = load_gray(frame.path, max(tw * 2, 64))
    tmpl = cv2.resize(small, (tw, max(8, int(round(tw * h / w)))), interpolation=cv2.INTER_AREA)
    x, y = frame.truth
    best = (-2.0, np.sqrt(lo * hi))
    for s in np.geomspace(lo, hi, cfg["ncc_candidates"]):
        d = tw / (w * s)                          # map px -> template px at this candidate
        half = 0.9 * max(w, h) * s
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


# ----------------------------------------------------------------------------- localization

@dataclass
class Estimate:
    id: int
    x: float
    y: float
    source: str                      # map | neighbour | relocalized | interpolated | anchor | truth
    H: np.ndarray | None = None      # original image px -> map.png px
    inliers: int = 0
    matches: int = 0
    rotation: float = 0.0
    anchor_id: int | None = None
    anchor_source: str = ""
    scale: float = 0.0
    window: tuple = ()
    runtime: float = 0.0
    stages: dict = field(default_factory=dict)   # seconds per pipeline stage (decode, extract, match, ...)
    error: str = ""

    def row(self) -> dict:
        return {"id": self.id, "x_pixel": round(self.x, 3), "y_pixel": round(self.y, 3), "source": self.source,
                "anchor_id": self.anchor_id, "anchor_source": self.anchor_source, "matches": self.matches,
                "inliers": self.inliers, "used_match": self.H is not None,
                "rotation": self.rotation, "scale": round(self.scale, 5),
                "crop_w": int(self.window[2] - self.window[0]) if self.window else 0,
                "crop_h": int(self.window[3] - self.window[1]) if self.window else 0,
                "runtime_s": round(self.runtime, 3), "error": self.error,
                "stages": json.dumps({k: round(v, 5) for k, v in self.stages.items()})}


@dataclass
class Attempt:
    H: np.ndarray | None
    inliers: int
    matches: int
    rotation: float
    window: tuple
    problem: str = ""
    pairs: tuple = ()                 # (query pts, map pts, inlier mask) for reports


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
        if d is None:
            return None
        return Estimate(**{**d, "H": None if d["H"] is None else np.array(d["H"]), "window": tuple(d["window"])})

    def put_estimate(self, phase: str, est: Estimate) -> None:
        d = dataclasses.asdict(est)
        d["H"] = None if est.H is None else est.H.tolist()
        d["window"] = [float(v) for v in est.window]
        self.put(phase, est.id, d)


class Localizer:
    """Everything one frame's localization needs; `locate` is the single code path of every mode."""

    def __init__(self, settings: dict, map_gray: np.ndarray, map_features: MapFeatures, matcher: Matcher,
                 cache: QueryCache, decoder: FrameDecoder):
        self.s = settings
        self.map_gray = map_gray
        self.mf = map_features
        self.matcher = matcher
        self.cache = cache
        self.decoder = decoder
        self.calib: Calibration | None = None
        self.frame_timing: dict[str, float] = {}   # seconds per stage of the frame being located

    def _tick(self, stage: str, t0: float) -> float:
        t = time.perf_counter()
        self.frame_timing[stage] = self.frame_timing.get(stage, 0.0) + t - t0
        return t

    def query_image(self, frame: Frame, rotation: float, target: float) -> tuple[np.ndarray, np.ndarray]:
        """The frame decoded near `target` x its size (capped at preprocess.max_side), preprocessed and
        rotated by `rotation`; returns the image and the homography original px -> its px."""
        t0 = time.perf_counter()
        w, h = image_size(frame.path)
        gray = self.decoder.get(frame.path, self.working_side(frame, target))
        t0 = self._tick("decode", t0)
        gray = preprocess(gray, self.s["preprocess"])
        img, rot = rotate_image(gray, rotation)
        self._tick("preprocess", t0)
        return img, rot @ scale_h(gray.shape[1] / w, gray.shape[0] / h)

    def working_side(self, frame: Frame, target: float) -> int:
        w, h = image_size(frame.path)
        return min(self.s["preprocess"]["max_side"], max(8, int(round(max(w, h) * target))))

    def prefetch(self, frame: Frame) -> None:
        """Start decoding `frame` in the background, unless its features are cached already."""
        target = self.view_scale(self.calib.expected_scale(frame))
        if not any(self.cache.has(self.cache.key(frame.path, r, target)) for r in self.hypotheses(None)):
            self.decoder.prefetch(frame.path, self.working_side(frame, target))

    def view_scale(self, expected_scale: float) -> float:
        """Query scale relative to original px, snapped to a log grid so that the features of one frame
        are reused across calibrations, search attempts and tuning trials."""
        target = expected_scale * self.mf.level * self.s["scale"]["virtual_zoom"]
        step = np.log(self.s["features"]["query_scale_step"])
        return float(np.exp(step * np.round(np.log(target) / step)))

    def view(self, frame: Frame, rotation: float, expected_scale: float) -> QueryView:
        """The frame scaled to the map level and rotated by `rotation`, with its features (cached)."""
        target = self.view_scale(expected_scale)
        key = self.cache.key(frame.path, rotation % 360, target)
        v = self.cache.get(key)
        if v is not None:
            return v
        img, to_view = self.query_image(frame, rotation, target)
        t0 = time.perf_counter()
        feats = self.matcher.extract(img)
        if rotation % 90:                  # drop keypoints on the rotated canvas' blank corners
            w, h = image_size(frame.path)
            orig = project(np.linalg.inv(to_view), feats.keypoints)
            margin = 4 / np.hypot(*to_view[:2, 0])
            feats = feats.subset(np.all((orig > margin) & (orig < np.array([w, h]) - margin), axis=1))
        self._tick("extract", t0)
        v = QueryView(feats, (img.shape[1], img.shape[0]), to_view)
        self.cache.put(key, v)
        return v

    def match_map(self, frame: Frame, rotation: float, centre, radius: float) -> Attempt:
        """Match one rotation hypothesis against the map keypoints of a window around `centre`."""
        scale = self.calib.expected_scale(frame)
        v = self.view(frame, rotation, scale)
        t0 = time.perf_counter()
        lv = self.mf.level
        w, h = image_size(frame.path)
        half = (0.5 * np.hypot(w, h) * scale * self.s["scale"]["crop_factor"] + radius) * lv
        cx, cy = (centre[0] + 0.5) * lv - 0.5, (centre[1] + 0.5) * lv - 0.5
        x0, y0 = max(0.0, cx - half), max(0.0, cy - half)
        x1, y1 = min(self.mf.size[0], cx + half), min(self.mf.size[1], cy + half)
        window = (x0 / lv, y0 / lv, x1 / lv, y1 / lv)
        sub, _ = self.mf.window(x0, y0, x1, y1, self.s["features"]["max_map_keypoints"])
        i0, i1, _ = self.matcher.match(v.features, v.size, sub, (int(np.ceil(x1 - x0)) + 1, int(np.ceil(y1 - y0)) + 1),
                                       self.s["features"]["match_threshold"])
        t0 = self._tick("match", t0)
        p0, p1 = v.features.keypoints[i0], sub.keypoints[i1]
        Hv, inl = estimate_homography(p0, p1, self.s["geometry"])
        self._tick("geometry", t0)
        attempt = Attempt(None, int(inl.sum()), len(i0), rotation, window, pairs=(p0, p1 + [x0, y0], inl))
        if Hv is None:
            attempt.problem = "no homography"
            return attempt
        H = np.linalg.inv(scale_h(lv, lv)) @ translate_h(x0, y0) @ Hv @ v.to_view
        return self._accept(attempt, H, frame, scale)

    def match_neighbour(self, frame: Frame, rotation: float, neighbour: Frame, n_est: Estimate) -> Attempt:
        """Match to a localized neighbour frame (same season and light) and compose its homography."""
        scale = self.calib.expected_scale(frame)
        v = self.view(frame, rotation, scale)
        nv = self.view(neighbour, n_est.rotation, self.calib.expected_scale(neighbour))
        t0 = time.perf_counter()
        i0, i1, _ = self.matcher.match(v.features, v.size, nv.features, nv.size, self.s["features"]["match_threshold"])
        t0 = self._tick("match", t0)
        p0, p1 = v.features.keypoints[i0], nv.features.keypoints[i1]
        Hv, inl = estimate_homography(p0, p1, self.s["geometry"])
        self._tick("geometry", t0)
        attempt = Attempt(None, int(inl.sum()), len(i0), rotation, ())
        if Hv is None:
            attempt.problem = "no homography"
            return attempt
        H = n_est.H @ np.linalg.inv(nv.to_view) @ Hv @ v.to_view
        return self._accept(attempt, H, frame, scale)

    def _accept(self, attempt: Attempt, H: np.ndarray, frame: Frame, scale: float) -> Attempt:
        g = self.s["geometry"]
        sc = self.s["scale"]
        problem = homography_problem(H, (frame.cx, frame.cy), scale, g["max_anisotropy"],
                                     (sc["clip_low"], sc["clip_high"]))
        if problem is None and attempt.inliers < g["min_inliers"]:
            problem = f"{attempt.inliers} inliers < {g['min_inliers']}"
        if problem is None:
            attempt.H = H
        attempt.problem = problem or ""
        return attempt

    def hypotheses(self, yaw_prior: float | None, limit: bool = True) -> list[float]:
        """Rotation hypotheses (degrees applied to the query), the heading prior's first; `limit`
        keeps localize.max_hypotheses of them (a relocalization tries them all)."""
        loc = self.s["localize"]
        step = loc["rotation_step"]
        if loc["rotation_search"] == "none":
            return [0.0]
        grid = [float(a) for a in np.arange(0, 360, step)]
        if loc["rotation_search"] == "all" or yaw_prior is None:
            return grid
        want = -yaw_prior
        dist = lambda a: abs((a - want + 180) % 360 - 180)  # noqa: E731
        return sorted(grid, key=dist)[:loc["max_hypotheses"] if limit else None]

    def relocalization_stages(self, frame: Frame, centre, radius: float, area) -> list[list[tuple]]:
        """Windows (centre, radius) of a widening search, stage by stage: growing radii around the
        anchor, then tiles over the area the known frames span, then tiles over the whole map."""
        loc = self.s["localize"]
        stages = [[(centre, radius * loc["relocalize_growth"] ** n)] for n in range(1, loc["relocalize_levels"] + 1)]
        w, h = image_size(frame.path)
        reach = np.hypot(w, h) * self.calib.expected_scale(frame)     # a footprint's diagonal, map px
        mh, mw = self.map_gray.shape
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
        d = abs((homography_yaw(H, (frame.cx, frame.cy)) - yaw_prior + 180) % 360 - 180)
        return d <= self.s["localize"]["rotation_step"] / 2

    def locate(self, frame: Frame, centre, radius: float, yaw_prior: float | None,
               neighbour: tuple[Frame, Estimate] | None = None, area=None,
               widen: bool = True) -> tuple[Estimate, Attempt | None]:
        """Map match over the rotation hypotheses; then neighbour match; then, with `widen`, a widening
        search (`area`: x0, y0, x1, y1 map px spanned by the known frames)."""
        t_start = time.perf_counter()
        self.frame_timing = {}
        loc = self.s["localize"]
        strong = loc["strong_inliers"]
        best: Attempt | None = None
        source = "map"
        rotations = self.hypotheses(yaw_prior)

        def better(a: Attempt, b: Attempt | None) -> bool:
            return b is None or (a.H is not None, a.inliers) > (b.H is not None, b.inliers)

        for rot in rotations:
            a = self.match_map(frame, rot, centre, radius)
            if better(a, best):
                best = a
            if best.H is not None and (best.inliers >= strong or self.agrees(best.H, frame, yaw_prior)):
                break
        if (best.H is None or best.inliers < strong) and neighbour and loc["neighbour_matching"] \
                and neighbour[1].H is not None:
            a = self.match_neighbour(frame, neighbour[1].rotation, *neighbour)
            if a.H is not None and (best.H is None or a.inliers > 2 * best.inliers):
                best, source = a, "neighbour"
        if best.H is None and loc["relocalize"] and widen:
            for stage in self.relocalization_stages(frame, centre, radius, area):
                attempts = [(c, r, rot) for c, r in stage for rot in self.hypotheses(yaw_prior, limit=False)]
                for c, r, rot in attempts:        # the stage's best match, unless one is strong at once
                    a = self.match_map(frame, rot, c, r)
                    if better(a, best):
                        best, source = a, "relocalized"
                    if a.H is not None and a.inliers >= strong:
                        break
                if best.H is not None:
                    break
        est = Estimate(frame.id, float(centre[0]), float(centre[1]), "anchor", rotation=best.rotation,
                       matches=best.matches, inliers=best.inliers, window=best.window,
                       scale=self.calib.expected_scale(frame), error=best.problem)
        if best.H is not None:
            x, y = project(best.H, [self.calib.ref_pixel(frame, best.H)])[0]
            est.x, est.y, est.H, est.source = float(x), float(y), best.H, source
            est.scale = homography_scale(best.H, (frame.cx, frame.cy))
        est.runtime = time.perf_counter() - t_start
        est.stages = dict(self.frame_timing)
        return est, best


def speed_bound(dataset: Dataset, ids: list[int], margin: float) -> float:
    """Map px per id the flight can plausibly cover, from the known train positions."""
    pts = [(i, dataset.frames[i].truth) for i in sorted(ids)]
    steps = [np.hypot(b[1][0] - a[1][0], b[1][1] - a[1][1]) / (b[0] - a[0]) for a, b in zip(pts, pts[1:])]
    return margin * float(np.percentile(steps, 95)) if steps else float("inf")


EXCEPTION_PREFIX = "raised "


def locate_guarded(loc: Localizer, frame: Frame, centre, radius: float, yaw, neighbour=None, area=None,
                   widen: bool = True) -> Estimate:
    """Localizer.locate, but a frame that raises an unexpected error is recorded with the error and
    treated as unmatched so the run goes on; run.strict re-raises instead."""
    try:
        return loc.locate(frame, centre, radius, yaw, neighbour, area, widen)[0]
    except UavlocError:
        raise
    except Exception as e:
        if loc.s["run"]["strict"]:
            raise FrameError(f"frame {frame.id} ({frame.path}) raised {type(e).__name__}: {e}; "
                             f"stopped there because of --strict / run.strict") from e
        return Estimate(frame.id, float(centre[0]), float(centre[1]), "anchor",
                        error=f"{EXCEPTION_PREFIX}{type(e).__name__}: {e}")


def height_from_ncc(loc: Localizer, dataset: Dataset, ids: list[int]) -> float:
    """The seed's height model: template NCC of a sample of train frames at their known positions."""
    sample = ids[:: max(1, len(ids) // 20)]
    ks = np.array([ncc_scale(dataset.frames[i], loc.map_gray, loc.s["scale"])[0] *
                   np.sqrt(dataset.frames[i].fx * dataset.frames[i].fy) for i in sample])
    return float(robust_center(ks)[0])


def register_train(loc: Localizer, dataset: Dataset, checkpoint: Checkpoint) -> dict[int, Estimate]:
    """Register every train frame at its known position (a narrow search) with the NCC height model.
    Their homographies give the scale model, the truth's image point and rotation priors."""
    ids = dataset.train_ids
    ncc = checkpoint.get("ncc", 0) or checkpoint.put("ncc", 0, {"k": height_from_ncc(loc, dataset, ids)})
    loc.calib = Calibration.from_ncc(ncc["k"])
    check_map_covers_frames(loc, dataset)
    known: dict[int, Estimate] = {}
    yaw = None
    for n, i in enumerate(tqdm(ids, desc="register train", disable=None, leave=False)):
        f = dataset.frames[i]
        est = checkpoint.estimate("register", i)
        if est is None:
            if n + 1 < len(ids):
                loc.prefetch(dataset.frames[ids[n + 1]])
            # the position is known: a frame that does not match there is not searched for elsewhere
            est = locate_guarded(loc, f, f.truth, loc.s["localize"]["search_radius"], yaw, widen=False)
            checkpoint.put_estimate("register", est)
        if est.H is not None:
            yaw = homography_yaw(est.H, (f.cx, f.cy))
        known[i] = dataclasses.replace(est, x=f.truth[0], y=f.truth[1], source="truth")
    return known


def check_map_covers_frames(loc: Localizer, dataset: Dataset) -> None:
    h, w = loc.map_gray.shape
    f = dataset.frames[dataset.train_ids[0]]
    fw, fh = image_size(f.path)
    foot = (fw * loc.calib.expected_scale(f), fh * loc.calib.expected_scale(f))
    if foot[0] > w or foot[1] > h:
        raise DataError(f"{dataset.map_path}: map ({w}x{h} px) is smaller than one frame's footprint "
                        f"({foot[0]:.0f}x{foot[1]:.0f} map px at the calibrated height)")


def fit_calibration(loc: Localizer, dataset: Dataset, registered: dict[int, Estimate], ids: list[int],
                    log=print) -> Calibration:
    """Scale model and the truth's image point from the registered frames among `ids` (robust medians).
    reference.mode auto keeps the pose model only where it predicts the train truths better."""
    rs = loc.s["reference"]
    reg = [registered[i] for i in ids if registered[i].H is not None]
    fr = [dataset.frames[e.id] for e in reg]
    calib = Calibration(loc.calib.k_ncc, loc.calib.k_ncc, 0.0, (0.0, 0.0), (0.0, 0.0), len(reg))
    if reg:
        kk = np.array([homography_scale(e.H, (f.cx, f.cy)) * np.sqrt(f.fx * f.fy) for e, f in zip(reg, fr)])
        calib.k, calib.k_spread = (float(v) for v in robust_center(kk))
    chosen = "centre"
    if rs["mode"] != "centre" and len(reg) >= rs["min_frames"]:
        truth = np.array([normalized_offset(project(np.linalg.inv(e.H), [f.truth])[0], f) for e, f in zip(reg, fr)])
        c, spread = robust_center(truth)
        calib.ref_offset, calib.ref_spread = (float(c[0]), float(c[1])), (float(spread[0]), float(spread[1]))
        chosen = "calibrated"
        nadirs = [nadir_offset(e.H, f) for e, f in zip(reg, fr)]
        ok = [i for i, o in enumerate(nadirs) if o is not None]
        if rs["mode"] in ("pose", "auto") and len(ok) >= rs["min_frames"]:
            on = np.array([nadirs[i] for i in ok])
            c, spread = robust_center(on)
            bias = np.median(truth[ok] - on, axis=0)
            pose = PoseModel(tuple(map(float, c)), tuple(map(float, spread)), tuple(map(float, bias)), rs["pose_clip"])
            err_fixed = truth_errors(calib, reg, fr)
            err_pose = truth_errors(dataclasses.replace(calib, pose=pose), reg, fr)
            log(f"reference pixel on the train frames: fixed point median error {np.median(err_fixed):.1f} px, "
                f"pose nadir {np.median(err_pose):.1f} px")
            if rs["mode"] == "pose" or np.median(err_pose) < np.median(err_fixed):
                calib.pose, chosen = pose, "pose"
    loc.calib = calib
    r, sp = calib.ref_offset, calib.ref_spread
    log(f"calibration: {len(reg)}/{len(ids)} train frames registered; height k (map px x fx / image px): "
        f"NCC {calib.k_ncc:.1f}, registered {calib.k:.1f} (spread {calib.k_spread:.1f}); reference pixel "
        f"offset ({r[0]:+.4f}, {r[1]:+.4f}) x f (spread {sp[0]:.4f}, {sp[1]:.4f}); truth predicted by: {chosen}")
    return calib


def truth_errors(calib: Calibration, reg: list[Estimate], frames: list[Frame]) -> np.ndarray:
    return np.array([np.hypot(*(project(e.H, [calib.ref_pixel(f, e.H)])[0] - f.truth)) for e, f in zip(reg, frames)])


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


def known_area(resolved: dict[int, Estimate], pad: float):
    """x0, y0, x1, y1 of the positions known so far, padded; None before any is known."""
    if not resolved:
        return None
    xy = np.array([(e.x, e.y) for e in resolved.values()])
    return (*(xy.min(axis=0) - pad), *(xy.max(axis=0) + pad))


def neighbours(i: int, resolved: dict[int, Estimate]) -> tuple[int | None, int | None]:
    before = [j for j in resolved if j < i]
    after = [j for j in resolved if j > i]
    return (max(before) if before else None), (min(after) if after else None)


def prior_for(i: int, resolved: dict[int, Estimate], both_ends: bool, map_centre) -> tuple:
    """(centre, id gap, anchor id): interpolated between the bracketing frames when both ends are used."""
    b, a = neighbours(i, resolved)
    if b is None and a is None:
        return map_centre, 1, None
    if both_ends and b is not None and a is not None:
        t = (i - b) / (a - b)
        pb, pa = resolved[b], resolved[a]
        centre = (pb.x + t * (pa.x - pb.x), pb.y + t * (pa.y - pb.y))
        return centre, min(i - b, a - i), (b if i - b <= a - i else a)
    if not both_ends:
        anchor = b if b is not None and (i - 1 in resolved or a is None) else (a if a is not None else b)
    else:
        anchor = b if b is not None else a
    return (resolved[anchor].x, resolved[anchor].y), abs(i - anchor), anchor


def localize_sequence(loc: Localizer, dataset: Dataset, known: dict[int, Estimate], targets: list[int],
                      checkpoint: Checkpoint, phase: str) -> dict[int, Estimate]:
    lz = loc.s["localize"]
    resolved = dict(known)      # frames with a trusted position, used as anchors
    done: dict[int, Estimate] = {}
    map_centre = (loc.map_gray.shape[1] / 2, loc.map_gray.shape[0] / 2)
    order = processing_order(targets, list(known), lz["both_ends"])
    for n, i in enumerate(tqdm(order, desc=phase, disable=None, leave=False)):
        frame = dataset.frames[i]
        est = checkpoint.estimate(phase, i)
        if est is None:
            if n + 1 < len(order):
                loc.prefetch(dataset.frames[order[n + 1]])
            centre, gap, anchor = prior_for(i, resolved, lz["both_ends"], map_centre)
            radius = min(lz["max_radius"], lz["search_radius"] + lz["radius_per_id"] * max(0, gap - 1))
            with_h = [j for j in resolved if resolved[j].H is not None]
            near = min(with_h, key=lambda j: (abs(j - i), j)) if with_h else None
            yaw = homography_yaw(resolved[near].H, (dataset.frames[near].cx, dataset.frames[near].cy)) \
                if near is not None else None
            nb = (dataset.frames[near], resolved[near]) if near is not None and abs(near - i) <= 2 else None
            est = locate_guarded(loc, frame, centre, radius, yaw, nb, known_area(resolved, lz["search_radius"]))
            est.anchor_id = anchor
            est.anchor_source = resolved[anchor].source if anchor is not None else "map centre"
            checkpoint.put_estimate(phase, est)
        done[i] = est
        if est.H is not None:
            resolved[i] = est
    if lz["sequence_check"]:
        bound = speed_bound(dataset, [j for j in known], lz["speed_margin"])
        reject_jumps(done, known, bound, lz["jump_slack"])
    fill_unmatched(done, known, map_centre)
    h, w = loc.map_gray.shape
    for e in done.values():
        e.x, e.y = float(np.clip(e.x, 0, w - 1)), float(np.clip(e.y, 0, h - 1))
    return done


def reject_jumps(done: dict[int, Estimate], known: dict[int, Estimate], bound: float, slack: float) -> None:
    """A matched frame whose position is further from its trusted neighbours' than the speed bound
    allows for the id gap is rejected (and later filled by interpolation)."""
    for i in sorted(done):
        e = done[i]
        if e.H is None:
            continue
        trusted = {j: v for j, v in {**known, **done}.items() if j != i and (v.H is not None or v.source == "truth")
                   and v.source != "interpolated"}
        b, a = neighbours(i, trusted)
        checks = [(trusted[j], abs(i - j)) for j in (b, a) if j is not None]
        if checks and all(np.hypot(e.x - n.x, e.y - n.y) > bound * gap + slack for n, gap in checks):
            e.source, e.error = "interpolated", f"rejected: jump beyond {bound:.0f} px/id"
            e.H = None


def fill_unmatched(done: dict[int, Estimate], known: dict[int, Estimate], map_centre) -> None:
    """Interpolate (in id) between the nearest trusted estimates; extrapolate at the ends."""
    trusted = {j: v for j, v in {**known, **done}.items() if v.H is not None or v.source == "truth"}
    ids = sorted(trusted)
    for i, e in done.items():
        if e.H is not None:
            continue
        e.source = "interpolated"
        if not ids:
            e.x, e.y = map_centre
            continue
        b, a = neighbours(i, trusted)
        if b is not None and a is not None:
            t = (i - b) / (a - b)
            e.x = trusted[b].x + t * (trusted[a].x - trusted[b].x)
            e.y = trusted[b].y + t * (trusted[a].y - trusted[b].y)
            continue
        side = [j for j in ids if (j < i if a is None else j > i)]
        side = side[-2:] if a is None else side[:2]
        p = trusted[side[-1] if a is None else side[0]]
        e.x, e.y = p.x, p.y
        if len(side) == 2:  # extrapolate along the last known motion
            j0, j1 = side
            v = ((trusted[j1].x - trusted[j0].x) / (j1 - j0), (trusted[j1].y - trusted[j0].y) / (j1 - j0))
            ref = side[-1] if a is None else side[0]
            e.x, e.y = trusted[ref].x + v[0] * (i - ref), trusted[ref].y + v[1] * (i - ref)


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


# ----------------------------------------------------------------------------- tuning

def search_space(settings: dict) -> dict[str, dict]:
    """tune.space from settings.toml: one table per dotted setting, `low`/`high` (+ `log`) or `choices`."""
    space = settings["tune"].get("space", {})
    if not space:
        raise UsageError("tune.space is empty: declare at least one [tune.space.\"section.key\"] table")
    for key, spec in space.items():
        section, _, name = key.partition(".")
        if section not in settings or not isinstance(settings[section], dict) or name not in settings[section]:
            raise UsageError(f"tune.space: '{key}' is not a setting")
        if "choices" in spec:
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise UsageError(f"tune.space.'{key}': choices must be a non-empty list")
        elif not ("low" in spec and "high" in spec and spec["low"] < spec["high"]):
            raise UsageError(f"tune.space.'{key}': give low < high, or choices")
    return space


def suggest(trial, space: dict[str, dict], base: dict) -> dict:
    """The trial's value for each setting of the space: integers stay integers, as in settings.toml."""
    params = {}
    for key, spec in space.items():
        section, _, name = key.partition(".")
        if "choices" in spec:
            params[key] = trial.suggest_categorical(key, spec["choices"])
        elif isinstance(base[section][name], int) and not isinstance(base[section][name], bool):
            params[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=spec.get("log", False))
        else:
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=spec.get("log", False))
    return params


def with_params(base: dict, params: dict) -> dict:
    s = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(s, key, value)
    return s


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


@dataclass
class TuneSplit:
    """Train frames split three ways; the holdout blocks are never seen by the study."""
    fit: list[int]
    val_blocks: list[list[int]]
    holdout: list[int]


def tune_split(train: list[int], settings: dict) -> TuneSplit:
    sp = settings["split"]
    holdout = block_split(train, settings["tune"]["holdout_fraction"], sp["block_min"], sp["block_max"], sp["seed"] + 1)
    study_ids = [i for i in train if i not in holdout]
    val = block_split(study_ids, sp["val_fraction"], sp["block_min"], sp["block_max"], sp["seed"])
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

    def __init__(self, base: dict, dataset: Dataset, weights: Path, out: Path, log=print):
        self.base, self.dataset, self.weights, self.out, self.log = base, dataset, weights, out, log
        self.localizers: dict[str, Localizer] = {}
        self.split = tune_split(dataset.train_ids, base)
        loc = self.localizer(base)
        self.registered = register_train(loc, dataset, open_checkpoint(base, dataset, out, fresh=False))
        self.k_ncc = loc.calib.k_ncc

    def localizer(self, settings: dict) -> Localizer:
        """One matcher and map-feature set per distinct feature setting; trials share them."""
        f = settings["features"]
        key = digest([settings["preprocess"], f["backend"], f["max_keypoints"], map_level(f), f["map_tile"],
                      f["map_keypoints_per_tile"]])
        if key not in self.localizers:
            self.localizers[key] = build_localizer(settings, self.dataset, self.weights, self.out, self.log)
        shared = self.localizers[key]
        return Localizer(settings, shared.map_gray, shared.mf, shared.matcher, shared.cache, shared.decoder)

    def estimates(self, settings: dict, known_ids: list[int], blocks: list[list[int]]):
        """Yields (block, its estimates) block by block, so the pruner can stop a trial early."""
        loc = self.localizer(settings)
        loc.calib = Calibration.from_ncc(self.k_ncc)
        fit_calibration(loc, self.dataset, self.registered, known_ids, log=lambda *a: None)
        known = {i: self.registered[i] for i in known_ids}
        for block in blocks:
            yield block, localize_sequence(loc, self.dataset, known, block, Checkpoint(None), "tune")

    def objective(self, trial, space: dict) -> float:
        import optuna
        settings = with_params(self.base, suggest(trial, space, self.base))
        values = []
        for block, est in self.estimates(settings, self.split.fit, self.split.val_blocks):
            for i in block:
                values.append(frame_score(est[i], self.dataset.frames[i].truth, settings["tune"]["tie_break"]))
                trial.report(values[-1], step=i)      # one instance per frame: what WilcoxonPruner compares
            if trial.should_prune():
                raise optuna.TrialPruned()
        return float(np.mean(values))

    def holdout_metric(self, settings: dict) -> dict:
        """The competition metric on the held-out blocks, with every other train frame known."""
        known = [i for i in self.dataset.train_ids if i not in self.split.holdout]
        blocks = runs_of(self.split.holdout, self.dataset.train_ids)
        est = {i: e for _, block_est in self.estimates(settings, known, blocks) for i, e in block_est.items()}
        pred = pd.DataFrame([e.row() for e in est.values()])[["id", "x_pixel", "y_pixel"]]
        return metric(pred, truth_table(self.dataset, list(est)))


def open_study(settings: dict, args, out: Path, fingerprint: str):
    """An Optuna study in an RDB (SQLite under <out>/tune/ by default), created or continued."""
    import optuna
    from optuna.trial import TrialState
    t = settings["tune"]
    name = args.study or t["study"]
    storage = args.storage or t["storage"] or f"sqlite:///{(out / 'tune' / f'{name}.db').resolve()}"
    (out / "tune").mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                pruner=optuna.pruners.WilcoxonPruner(p_threshold=t["pruner_p"]))
    if study.user_attrs.get("fingerprint", fingerprint) != fingerprint:
        raise UsageError(f"study '{name}' in {storage} was run on other data, space or base settings; "
                         f"pick another --study name")
    study.set_user_attr("fingerprint", fingerprint)
    if not study.trials:   # the base settings are trial 0: the study's best is never worse on validation
        study.enqueue_trial({k: settings[k.partition(".")[0]][k.partition(".")[2]] for k in search_space(settings)})
    for tr in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # a killed run leaves its last trial RUNNING: close it so the study continues cleanly
        study._storage.set_trial_state_values(tr._trial_id, TrialState.FAIL)
    # a resumed study draws fresh parameters instead of replaying the first run's random start
    study.sampler = optuna.samplers.TPESampler(multivariate=True, seed=t["sampler_seed"] + len(study.trials))
    return study, storage


def mode_tune(args, settings: dict, weights: Path, out: Path) -> None:
    import optuna
    from optuna.trial import TrialState
    dataset = load_dataset(Path(args.data or settings["run"]["data"]))
    space = search_space(settings)
    n_trials = args.trials or settings["tune"]["trials"]
    tuner = Tuner(settings, dataset, weights, out)
    sp = tuner.split
    print(f"tune: {len(sp.fit)} known train frames, {sum(map(len, sp.val_blocks))} validation frames in "
          f"{len(sp.val_blocks)} blocks, {len(sp.holdout)} held-out frames the study never sees")
    fingerprint = digest([data_fingerprint(dataset), space, {k: settings[k] for k in RESULT_SECTIONS},
                          dataclasses.asdict(sp)])
    study, storage = open_study(settings, args, out, fingerprint)
    done = lambda: len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))  # noqa: E731
    todo = max(0, n_trials - done())
    print(f"study '{study.study_name}' in {storage}: {done()} finished trials, running {todo} more")
    bar = tqdm(total=todo, desc="trials", disable=None)

    def progress(study, trial):
        bar.update(1)
        if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            bar.set_postfix(best=f"{study.best_value:.2f}", last=trial.state.name.lower())

    if todo:
        study.optimize(lambda tr: tuner.objective(tr, space), n_trials=todo, callbacks=[progress])
    bar.close()
    write_tune_outputs(study, settings, tuner, out, args.apply)


def write_tune_outputs(study, settings: dict, tuner: Tuner, out: Path, apply: bool) -> None:
    import optuna
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise UsageError(f"study '{study.study_name}' has no complete trial yet")
    write_csv(study.trials_dataframe(), out / "tune" / "trials.csv")
    best = study.best_trial
    header = f"uavloc tune: study '{study.study_name}', trial {best.number}, objective {best.value:.3f}"
    atomic_write(out / "best_params.toml", params_toml(best.params, header))
    plot_study(study, out / "tune")
    held_best = tuner.holdout_metric(with_params(settings, best.params))
    held_base = tuner.holdout_metric(settings)
    print(f"best trial {best.number}: study objective {best.value:.3f} (validation score less "
          f"{settings['tune']['tie_break']} x mean px); held-out ({len(tuner.split.holdout)} frames the study "
          f"never saw): best parameters {format_metric(held_best)}; base settings {format_metric(held_base)}")
    print(f"wrote {out / 'best_params.toml'} (use: --settings {out / 'best_params.toml'}), "
          f"{out / 'tune' / 'trials.csv'}, plots in {out / 'tune'}")
    atomic_write(out / "tune" / "holdout.json", json.dumps({"best": held_best, "base": held_base,
                                                            "study_best": best.value, "params": best.params}, indent=1))
    if apply:
        atomic_write(out / "settings_tuned.toml", apply_params(default_settings_text(), best.params))
        print(f"wrote {out / 'settings_tuned.toml'}: diff it against settings.toml")


def plot_study(study, folder: Path) -> None:
    import optuna
    plt = plt_agg()
    from optuna.visualization import matplotlib as ovm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # optuna marks its matplotlib plots experimental
        ax = ovm.plot_optimization_history(study)
        save_figure(ax.figure, folder / "optimization_history.png")
        plt.close(ax.figure)
        if len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) >= 2:
            ax = ovm.plot_param_importances(study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
            save_figure(ax.figure, folder / "param_importances.png")
            plt.close(ax.figure)


# ----------------------------------------------------------------------------- reports

SOURCE_COLOURS = {"map": "tab:green", "neighbour": "tab:cyan", "relocalized": "tab:orange",
                  "interpolated": "tab:red", "anchor": "tab:purple"}


def plt_agg():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


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
        for src, g in df.groupby("source"):
            ax.scatter(g.x_pixel, g.y_pixel, s=18, marker=marker, c=SOURCE_COLOURS.get(src, "k"),
                       label=f"{name}: {src}")
        if "x_truth" in df:
            for r in df.itertuples():
                ax.plot([r.x_truth, r.x_pixel], [r.y_truth, r.y_pixel], "y-", lw=0.8)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("uavloc: train positions, validation (truth-prediction lines) and test predictions")
    save_figure(fig, path)
    plt.close(fig)


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
                 f"{attempt.rotation:.0f} deg, source {est.source}")
    save_figure(fig, path)
    plt.close(fig)


# ----------------------------------------------------------------------------- runs

def weights_dir(settings: dict, flag: str | None) -> Path:
    return Path(flag or os.environ.get("UAVLOC_WEIGHTS") or settings["run"]["weights_dir"]).expanduser()


def setup_torch(settings: dict) -> None:
    if settings["features"]["backend"] == "sift":
        return
    import torch
    if settings["run"]["threads"]:
        torch.set_num_threads(int(settings["run"]["threads"]))
    torch.manual_seed(0)


def build_localizer(settings: dict, dataset: Dataset, weights: Path, out: Path, log=print) -> Localizer:
    setup_torch(settings)
    matcher = Matcher(settings["features"], weights, settings["run"]["device"], Path(settings["run"]["wheels_dir"]))
    map_gray = read_image(dataset.map_path)
    t0 = time.perf_counter()
    mf, hit = cached_map_features(dataset.map_path, map_gray, matcher, settings, out / "cache")
    log(f"map features: {len(mf.features.keypoints)} keypoints at level {mf.level} "
        f"({'reused from cache' if hit else 'extracted'}, {time.perf_counter() - t0:.1f}s); "
        f"backend {matcher.backend} on {matcher.device or 'cpu'}")
    cache = QueryCache(out / "cache" / "query" if settings["run"]["feature_cache"] else None, settings,
                       str(matcher.device or "cpu"))
    return Localizer(settings, map_gray, mf, matcher, cache, FrameDecoder(settings["run"]["prefetch"]))


# settings sections that change a frame's result: a checkpoint is only replayed when they are unchanged
RESULT_SECTIONS = ("split", "preprocess", "features", "geometry", "scale", "reference", "localize")


def data_fingerprint(dataset: Dataset) -> str:
    """The CSVs' contents and every image's name, size and mtime: cheap, and changes with any edit."""
    h = hashlib.sha1()
    for name in ("train_data/train_cam.csv", "train_data/train_pos.csv", "test_data/test_cam.csv"):
        h.update((dataset.root / name).read_bytes())
    for f in [dataset.map_path] + [fr.path for _, fr in sorted(dataset.frames.items())]:
        st = f.stat()
        h.update(f"{f.name} {st.st_size} {st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def open_checkpoint(settings: dict, dataset: Dataset, out: Path, fresh: bool) -> Checkpoint:
    if not settings["run"]["resume"]:
        return Checkpoint(None)
    # the code is part of the key too: an edited uavloc.py never replays results of the old one
    key = digest([settings[k] for k in RESULT_SECTIONS] + [settings["run"]["device"], digest(MODULE_FILE.read_text())])
    return Checkpoint(out / "checkpoints" / f"{key}_{data_fingerprint(dataset)}.jsonl", fresh)


def predictions_frame(est: dict[int, Estimate], dataset: Dataset) -> pd.DataFrame:
    df = pd.DataFrame([e.row() for _, e in sorted(est.items())])
    truth = [dataset.frames[i].truth for i in df["id"]]
    if all(t is not None for t in truth) and len(truth):
        df["x_truth"], df["y_truth"] = [t[0] for t in truth], [t[1] for t in truth]
        df["error_px"] = np.hypot(df.x_pixel - df.x_truth, df.y_pixel - df.y_truth).round(2)
    return df


def write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, df.to_csv(index=False))


def validate_submission(sub: pd.DataFrame, dataset: Dataset, map_size: tuple[int, int]) -> None:
    ids = dataset.test_ids
    if sorted(sub["id"].tolist()) != ids:
        raise UavlocError("internal error: the submission does not hold every test id exactly once")
    xy = sub[["x_pixel", "y_pixel"]].to_numpy(float)
    w, h = map_size
    if not np.all(np.isfinite(xy)) or (xy < 0).any() or (xy[:, 0] > w).any() or (xy[:, 1] > h).any():
        raise UavlocError("internal error: the submission has a non-finite or off-map position")


def run_validation(loc: Localizer, dataset: Dataset, registered: dict[int, Estimate], checkpoint: Checkpoint,
                   out: Path, log=print) -> pd.DataFrame:
    """Hide blocks of train frames, calibrate on the rest, localize the hidden ones and score them."""
    sp = loc.s["split"]
    train = dataset.train_ids
    val_ids = block_split(train, sp["val_fraction"], sp["block_min"], sp["block_max"], sp["seed"])
    fit_ids = [i for i in train if i not in val_ids]
    fit_calibration(loc, dataset, registered, fit_ids, log)
    est = localize_sequence(loc, dataset, {i: registered[i] for i in fit_ids}, val_ids, checkpoint, "validation")
    df = predictions_frame(est, dataset)
    m = metric(df[["id", "x_pixel", "y_pixel"]], truth_table(dataset, val_ids))
    write_csv(df, out / "val_predictions.csv")
    log(f"validation ({len(val_ids)} hidden train frames in blocks, {len(fit_ids)} known): {format_metric(m)}")
    atomic_write(out / "val_metric.json", json.dumps(m, indent=1))
    return df


def truth_table(dataset: Dataset, ids: list[int]) -> pd.DataFrame:
    """id, x_pixel, y_pixel of train frames, in the submission's columns, for the metric."""
    return pd.DataFrame([(i, *dataset.frames[i].truth) for i in ids], columns=["id", "x_pixel", "y_pixel"])


def run_test(loc: Localizer, dataset: Dataset, registered: dict[int, Estimate], checkpoint: Checkpoint,
             out: Path, log=print) -> pd.DataFrame:
    """Calibrate on every train frame, localize the test frames, check and write the submission."""
    c = fit_calibration(loc, dataset, registered, dataset.train_ids, log)
    atomic_write(out / "calibration.json", json.dumps(dataclasses.asdict(c), indent=1))
    est = localize_sequence(loc, dataset, registered, dataset.test_ids, checkpoint, "test")
    df = predictions_frame(est, dataset)
    sub = df[["id", "x_pixel", "y_pixel"]].sort_values("id")
    validate_submission(sub, dataset, (loc.map_gray.shape[1], loc.map_gray.shape[0]))
    write_csv(df, out / "test_predictions.csv")
    write_csv(sub, out / "submission.csv")
    counts = df["source"].value_counts().to_dict()
    log(f"submission: {len(sub)} test frames -> {out / 'submission.csv'} (sources: {counts})")
    return df


@dataclass
class RunResult:
    setup_s: dict[str, float]          # one-off costs: map features, registration, validation
    test_stages: list[dict]            # per test frame: seconds per stage


def run_data(args, settings: dict, weights: Path, out: Path, mode: str, log=print) -> RunResult:
    """The submit/validate/bench job: register the train frames once, validate, then the test frames."""
    dataset = load_dataset(Path(args.data or settings["run"]["data"]))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "settings_used.toml", dump_toml(settings))
    setup: dict[str, float] = {}
    t0 = time.perf_counter()
    loc = build_localizer(settings, dataset, weights, out, log)
    t0 = tick(setup, "map features and networks", t0)
    checkpoint = Checkpoint(None) if mode == "bench" else open_checkpoint(settings, dataset, out, args.fresh)
    registered = register_train(loc, dataset, checkpoint)
    t0 = tick(setup, f"registration of {len(registered)} train frames", t0)
    val = run_validation(loc, dataset, registered, checkpoint, out, log) \
        if settings["run"]["validate"] or mode == "validate" else None
    t0 = tick(setup, "validation", t0)
    test = run_test(loc, dataset, registered, checkpoint, out, log) if mode != "validate" else None
    write_reports(loc, dataset, out, val, test)
    frames = [e for df in (val, test) if df is not None for e in df.itertuples()]
    failed = [(int(e.id), e.error) for e in frames if str(e.error).startswith(EXCEPTION_PREFIX)]
    write_csv(pd.DataFrame(failed, columns=["id", "error"]), out / "failed_frames.csv")
    if failed:
        log(f"{len(failed)} frame(s) raised and were filled like unmatched frames: "
            f"{', '.join(str(i) for i, _ in failed)} (see {out / 'failed_frames.csv'}; --strict stops instead)")
    if checkpoint.path is not None:
        log(f"checkpoint: {checkpoint.replayed} results replayed from {checkpoint.path}")
    log(f"query feature cache: {loc.cache.hits} hits, {loc.cache.misses} extracted")
    stages = [json.loads(s) for s in test["stages"]] if test is not None else []
    return RunResult(setup, stages)


def tick(times: dict, name: str, t0: float) -> float:
    t = time.perf_counter()
    times[name] = t - t0
    return t


def write_reports(loc: Localizer, dataset: Dataset, out: Path, val: pd.DataFrame | None,
                  test: pd.DataFrame | None) -> None:
    if not loc.s["report"]["enabled"]:
        return
    plot_overview(loc.map_gray, dataset, val, test, out / "report" / "map_overview.png")
    if val is None or "error_px" not in val:
        return
    for fid in val.sort_values("error_px", ascending=False)["id"].head(loc.s["report"]["worst_frames"]):
        report_frame(loc, dataset, int(fid), out)


def report_frame(loc: Localizer, dataset: Dataset, fid: int, out: Path, prior=None) -> Path:
    """Re-run one frame's map match near its prior (its truth for a train frame) and draw it."""
    f = dataset.frames[fid]
    centre = prior or f.truth or (loc.map_gray.shape[1] / 2, loc.map_gray.shape[0] / 2)
    est, attempt = loc.locate(f, centre, loc.s["localize"]["search_radius"], None)
    path = out / "report" / f"matches_{fid}.png"
    if attempt is not None and attempt.pairs:
        query, _ = loc.query_image(f, attempt.rotation, loc.view_scale(loc.calib.expected_scale(f)))
        plot_matches(loc.map_gray, query, attempt, est, loc.mf.level, path, f.truth)
    return path


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


@dataclass
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


def detect_kaggle(settings: dict) -> KaggleEnv | None:
    """On Kaggle (a /kaggle/input folder; $UAVLOC_KAGGLE_ROOT moves the root for a simulated run):
    the competition data is the folder with train_data/ and test_data/, the weights dataset the one
    with the backend's files, the wheels dataset the one with a kornia wheel."""
    root = Path(os.environ.get("UAVLOC_KAGGLE_ROOT", settings["kaggle"]["root"]))
    inputs = root / "input"
    if not inputs.is_dir():
        return None
    data = find_folder(inputs, lambda f: (f / "train_data").is_dir() and (f / "test_data").is_dir())
    if data is None:
        raise DataError(f"{inputs}: no competition data (a folder holding train_data/ and test_data/); "
                        f"add the competition to the kernel's inputs")
    names = list(WEIGHT_FILES[settings["features"]["backend"]])
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


def kernel_metadata(settings: dict) -> dict:
    k = settings["kaggle"]
    return {"id": k["kernel_id"], "title": k["kernel_title"], "code_file": "uavloc.py", "language": "python",
            "kernel_type": "script", "is_private": True, "enable_gpu": True, "enable_internet": False,
            "competition_sources": [k["competition"]], "dataset_sources": [k["weights_dataset"], k["wheels_dataset"]],
            "kernel_sources": [], "model_sources": []}


def kaggle_sync(settings: dict) -> str:
    """Mirror uavloc.py + settings.toml into kaggle/ (never edit those by hand)."""
    atomic_write(KAGGLE_DIR / "uavloc.py", kernel_source(DEFAULT_SETTINGS.read_text()))
    atomic_write(KAGGLE_DIR / "kernel-metadata.json", json.dumps(kernel_metadata(settings), indent=2) + "\n")
    return f"synced {KAGGLE_DIR / 'uavloc.py'} and {KAGGLE_DIR / 'kernel-metadata.json'}"


def build_kaggle_datasets(settings: dict, weights: Path, out: Path) -> str:
    """<out>/kaggle-datasets/uavloc-weights/ and uavloc-wheels/, ready for `kaggle datasets create -p`."""
    k = settings["kaggle"]
    root = out / "kaggle-datasets"
    w = root / "uavloc-weights"
    w.mkdir(parents=True, exist_ok=True)
    names = [n for b in ("aliked", "xfeat") for n in WEIGHT_FILES[b]]
    missing = [n for n in names if not (weights / n).is_file()]
    if missing:
        raise WeightsError(f"{weights}: missing {', '.join(missing)} for the weights dataset")
    for n in names + ["MANIFEST.md"]:
        if (weights / n).is_file():
            shutil.copy2(weights / n, w / n)
    write_dataset_metadata(w, k["weights_dataset"], "uavloc weights (ALIKED, XFeat, LightGlue)")
    h = root / "uavloc-wheels"
    h.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(h),
           "--python-version", k["python_version"], "--platform", "manylinux2014_x86_64",
           "--platform", "manylinux_2_17_x86_64", *k["wheels"]]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise UsageError(f"pip download of {' '.join(k['wheels'])} failed (needs a package index): "
                         f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    write_dataset_metadata(h, k["wheels_dataset"], "uavloc offline wheels (kornia)")
    return f"built {w} and {h}: upload each with `kaggle datasets create -p FOLDER`"


def write_dataset_metadata(folder: Path, dataset_id: str, title: str) -> None:
    atomic_write(folder / "dataset-metadata.json", json.dumps(
        {"title": title, "id": dataset_id, "licenses": [{"name": "other"}]}, indent=2) + "\n")


# ----------------------------------------------------------------------------- CLI

MODES = ("submit", "validate", "bench", "tune", "locate", "demo", "report", "kaggle-sync", "kaggle-datasets")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="uavloc", description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=MODES, default="submit")
    ap.add_argument("--data", help="competition data folder (map.png, train_data/, test_data/)")
    ap.add_argument("--out", help="output folder (default: run.out, build/)")
    ap.add_argument("--settings", help="TOML file overriding settings.toml")
    ap.add_argument("--preset", help="a [presets.NAME] table of settings.toml, e.g. reference")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    ap.add_argument("--weights", help="weights folder (overrides $UAVLOC_WEIGHTS and run.weights_dir)")
    ap.add_argument("--fresh", action="store_true", help="ignore finished frames of an earlier run (see run.resume)")
    ap.add_argument("--strict", action="store_true", help="stop at a frame that raises instead of recording it")
    ap.add_argument("--solution", help="solution.csv to score the submission against (--mode bench)")
    ap.add_argument("--trials", type=int, help="--mode tune: finished trials the study should reach (tune.trials)")
    ap.add_argument("--study", help="--mode tune: study name (tune.study)")
    ap.add_argument("--storage", help="--mode tune: Optuna storage URL (default: sqlite under <out>/tune/)")
    ap.add_argument("--apply", action="store_true", help="--mode tune: also write <out>/settings_tuned.toml")
    ap.add_argument("--id", type=int, help="frame id for --mode report")
    ap.add_argument("--map", help="map image for --mode locate")
    ap.add_argument("--frame", help="frame image for --mode locate")
    for k in ("fx", "fy", "cx", "cy"):
        ap.add_argument(f"--{k}", type=float, help=f"intrinsics for --mode locate ({k})")
    ap.add_argument("--prior", help="X,Y map px prior for --mode locate")
    ap.add_argument("--radius", type=float, help="search radius in map px for --mode locate")
    ap.add_argument("--ref-pixel", help="U,V normalized (0..1) image point to report for --mode locate")
    return ap.parse_args(argv)


def pair(text: str, name: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
        return a, b
    except (ValueError, AttributeError):
        raise UsageError(f"{name} takes two numbers as X,Y, got {text!r}") from None


def mode_locate(args, settings: dict, weights: Path, out: Path) -> None:
    """One frame near a prior, through the same Localizer.locate as submit."""
    missing = [n for n in ("map", "frame", "fx", "fy", "cx", "cy", "prior") if getattr(args, n) is None]
    if missing:
        raise UsageError(f"--mode locate needs --{', --'.join(missing)}")
    frame_path = Path(args.frame)
    if not frame_path.is_file():
        raise DataError(f"{frame_path}: frame image not found")
    if not Path(args.map).is_file():
        raise DataError(f"{args.map}: map image not found")
    prior = pair(args.prior, "--prior")
    frame = Frame(0, frame_path, args.fx, args.fy, args.cx, args.cy, "test")
    ds = Dataset(Path(args.map).parent, Path(args.map), {0: frame})
    loc = build_localizer(settings, ds, weights, out, log=lambda *a: print(*a, file=sys.stderr))
    calib_path = out / "calibration.json"
    calib = json.loads(calib_path.read_text()) if calib_path.is_file() else None
    k = calib["k"] if calib else None
    ref = tuple(calib["ref_offset"]) if calib else (0.0, 0.0)
    pose = PoseModel(**calib["pose"]) if calib and calib.get("pose") and not args.ref_pixel else None
    w, h = image_size(frame_path)
    if args.ref_pixel:
        u, v = pair(args.ref_pixel, "--ref-pixel")
        ref = ((u * w - frame.cx) / frame.fx, (v * h - frame.cy) / frame.fy)
    if k is None:  # no calibration: the frame footprint is taken as 1/8 of the map's smaller side
        k = min(loc.map_gray.shape) / 8 / w * np.sqrt(frame.fx * frame.fy)
        loc.s["scale"]["clip_low"], loc.s["scale"]["clip_high"] = 0.25, 4.0
    loc.calib = Calibration(k, k, 0.0, ref, (0.0, 0.0), 0, pose)
    radius = args.radius if args.radius is not None else settings["localize"]["search_radius"]
    est, _ = loc.locate(frame, prior, radius, None)
    print(json.dumps({"x": round(est.x, 3), "y": round(est.y, 3), "inliers": est.inliers, "matches": est.matches,
                      "rotation": est.rotation, "source": est.source, "matched": est.H is not None,
                      "runtime_s": round(est.runtime, 3)}))


def mode_bench(args, settings: dict, weights: Path, out: Path) -> None:
    """Submit with no checkpoint replay, then one line per stage: mean and p95 seconds per test frame."""
    import resource
    t0 = time.perf_counter()
    r = run_data(args, settings, weights, out, "bench")
    wall = time.perf_counter() - t0
    stages = pd.DataFrame(r.test_stages).fillna(0.0)
    stages["total"] = stages.sum(axis=1)
    device = settings["run"]["device"]
    if settings["features"]["backend"] != "sift":
        device = str(pick_device(device))
    print(f"bench: {len(stages)} test frames of {args.data or settings['run']['data']}; "
          f"backend {settings['features']['backend']}, device {device}")
    print(f"{'stage':<12}{'mean_s':>9}{'p95_s':>9}   per test frame")
    for name in [c for c in ("decode", "preprocess", "extract", "match", "geometry") if c in stages] + ["total"]:
        col = stages[name]
        print(f"{name:<12}{col.mean():9.3f}{col.quantile(0.95):9.3f}")
    for name, sec in r.setup_s.items():
        print(f"setup: {name}: {sec:.1f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    line = f"wall {wall:.1f} s; peak memory {peak:.2f} GiB (process RSS)"
    if device.startswith("cuda"):
        import torch
        line += f", {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB on the GPU"
    print(line)
    if args.solution:
        m = metric(pd.read_csv(out / "submission.csv"), read_table(Path(args.solution), ["id", "x_pixel", "y_pixel"]))
        print(f"score: {format_metric(m)}")


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        settings = load_settings(args.settings, args.preset, args.set)
        settings["run"]["strict"] = settings["run"]["strict"] or args.strict
        kaggle = detect_kaggle(settings)
        if kaggle:             # inputs and outputs found without flags; flags still win
            args.data = args.data or str(kaggle.data)
            args.out = args.out or str(kaggle.working)
            args.weights = args.weights or os.environ.get("UAVLOC_WEIGHTS") or (kaggle.weights and str(kaggle.weights))
            settings["run"]["wheels_dir"] = str(kaggle.wheels or settings["run"]["wheels_dir"])
            print(f"kaggle: data {kaggle.data}, weights {kaggle.weights}, wheels {kaggle.wheels}, "
                  f"output {kaggle.working}")
        out = Path(args.out or settings["run"]["out"])
        weights = weights_dir(settings, args.weights)
        if args.mode == "kaggle-sync":
            print(kaggle_sync(settings))
        elif args.mode == "kaggle-datasets":
            print(build_kaggle_datasets(settings, weights, out))
        elif args.mode == "locate":
            mode_locate(args, settings, weights, out)
        elif args.mode == "report":
            if args.id is None:
                raise UsageError("--mode report needs --id N")
            dataset = load_dataset(Path(args.data or settings["run"]["data"]))
            if args.id not in dataset.frames:
                raise UsageError(f"--id {args.id} is not a frame of {dataset.root}")
            loc = build_localizer(settings, dataset, weights, out)
            registered = register_train(loc, dataset, open_checkpoint(settings, dataset, out, args.fresh))
            fit_calibration(loc, dataset, registered, dataset.train_ids)
            print(report_frame(loc, dataset, args.id, out))
        elif args.mode == "demo":
            demo = out / "demo"
            if not (demo / "data" / "map.png").is_file():
                make_demo(demo)
            args.data = str(demo / "data")
            run_data(args, settings, weights, demo / "run", "demo")
            truth = pd.read_csv(demo / "solution.csv")
            m = metric(pd.read_csv(demo / "run" / "submission.csv"), truth)
            print(f"demo test score: {format_metric(m)}")
        elif args.mode == "bench":
            mode_bench(args, settings, weights, out)
        elif args.mode == "tune":
            mode_tune(args, settings, weights, out)
        else:
            run_data(args, settings, weights, out, args.mode)
        return 0
    except UavlocError as e:
        print(f"uavloc: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("uavloc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
