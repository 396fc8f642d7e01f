"""Synthetic brain-MRI phantoms laid out exactly like the Kaggle LGG ``kaggle_3m`` set.

The real data set stores one folder per patient::

    <root>/<patient>/<patient>_<n>.tif        # uint8 (H, W, 3): pre-contrast, FLAIR, post-contrast
    <root>/<patient>/<patient>_<n>_mask.tif   # uint8 (H, W), values {0, 255}

with slice numbers ``n`` starting at 1 and not zero-padded. :func:`write_synthetic_dataset`
writes phantom patients (folders ``SYN_P001_20000101``, ``SYN_P002_20000101``, ...) in that
layout so that the data pipeline, training loop and tests can run without the real images.

Each phantom patient is a stack of axial slices of a brain-like ellipse:

* a slightly brighter skull rim around brain tissue whose intensity carries a smooth,
  low-frequency texture (continuous across slices) plus mild gaussian noise; the background
  is ~0;
* the ellipse grows and then shrinks across the stack, like an axial series running from the
  vertex to the skull base (small on the first and last slices); two dark ventricles appear on
  the central slices;
* the three channels differ in intensity, the FLAIR channel (index 1) having the brightest
  tissue;
* most patients carry one lesion: an ellipsoid blob inside the brain spanning a contiguous run
  of slices in the middle part of the volume (never the first or last slice). It is clearly
  hyperintense in FLAIR (+70..+100 grey levels over tissue), slightly darker on the
  pre-contrast and slightly brighter on the post-contrast channel. Its mask (0/255) is exactly
  the lesion region of the slice, covers at least ~0.5 % of the slice, and is all zero on the
  slices outside the run;
* a fraction ``tumour_free_patients`` of patients (at least one when there are three or more
  patients and the fraction is positive) has no lesion at all.

Generation is deterministic for a given seed and fully vectorised (8 patients x 20 slices at
256 x 256 take well under a second plus TIFF writing time). A marker file
``<root>/.synthetic.json`` holding the parameters is written last, so a repeated call with the
same parameters is a no-op while a changed or interrupted data set is rewritten cleanly (only
the ``SYN_*`` patient folders and the marker are ever deleted). A folder that holds anything
else (a real data set, a file of the user's) is never written to: :func:`write_synthetic_dataset`
refuses it, naming what it found (:func:`foreign_entries`). ``data=synthetic`` writes its
phantoms under tlunet's cache only (:class:`tlunet.data.datamodule.LGGDataModule`).

Command line::

    python -m tlunet.data.synthetic OUT_DIR --patients 8 --size 256 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from scipy import ndimage

from tlunet.errors import ConfigError, TlunetError
from tlunet.utils import (
    is_atomic_temporary,
    names_and_more,
    write_json_atomic,
    write_text_atomic,
)

__all__ = [
    "FORMAT_VERSION",
    "MARKER_NAME",
    "PATIENT_NAME_RE",
    "SETTINGS",
    "PhantomVolume",
    "foreign_entries",
    "holds_phantoms",
    "make_phantom_volume",
    "patient_name",
    "phantom_folder_name",
    "write_synthetic_dataset",
]

FORMAT_VERSION = 1
MARKER_NAME = ".synthetic.json"
README_NAME = "README.md"
#: The files beside the patient folders that the generator writes (atomically: an interrupted
#: write leaves a temporary of tlunet.utils.atomic_path, which is its own too).
_OWN_FILES = (MARKER_NAME, README_NAME)
PATIENT_NAME_RE = re.compile(r"^SYN_P\d{3}_20000101$")
#: The settings of ``data.synthetic`` (the keyword arguments of :func:`write_synthetic_dataset`
#: that shape the phantoms): each changes the phantoms, so each is in their folder's name.
SETTINGS = ("num_patients", "slices_per_patient", "image_size", "tumour_free_patients", "seed")
_README_HEADER = "# Synthetic LGG phantoms (tlunet)"
_MIN_SLICES = 3
_MIN_SIZE = 32

# Per-channel grey levels: (pre-contrast, FLAIR, post-contrast).
_TISSUE = np.array([85.0, 115.0, 95.0], dtype=np.float32)
_RIM = np.array([120.0, 150.0, 135.0], dtype=np.float32)
_TEXTURE_AMP = np.array([10.0, 14.0, 10.0], dtype=np.float32)
_VENTRICLE_FACTOR = np.array([0.5, 0.35, 0.55], dtype=np.float32)
_LESION_SHIFT_OTHER = np.array([-12.0, 0.0, 18.0], dtype=np.float32)  # FLAIR shift is drawn
_NOISE_SIGMA = 4.0


def patient_name(index: int) -> str:
    """Folder name of phantom patient ``index`` (1-based), e.g. ``SYN_P001_20000101``."""
    return f"SYN_P{index:03d}_20000101"


@dataclass(frozen=True)
class PhantomVolume:
    """One phantom patient held in memory.

    Attributes:
        images: uint8 array (n_slices, H, W, 3).
        masks: uint8 array (n_slices, H, W) with values {0, 255}.
        lesion_slices: 0-based inclusive ``(first, last)`` slice index of the lesion run, or
            ``None`` for a tumour-free patient.
    """

    images: np.ndarray
    masks: np.ndarray
    lesion_slices: tuple[int, int] | None


def _smooth_field(
    rng: np.random.Generator, n: int, size: int, grid: int, sigma: float
) -> np.ndarray:
    """Unit-variance smooth random field (n, size, size) grown from a coarse ``grid`` of noise.

    The coarse noise is smoothed across slices and upsampled in-plane with a separable gaussian
    interpolation matrix (``sigma`` in coarse-grid cells), i.e. two small matrix products.
    """
    grid = max(4, min(grid, size))
    coarse = rng.standard_normal((n, grid, grid)).astype(np.float32)
    coarse = ndimage.gaussian_filter1d(coarse, sigma=0.8, axis=0, mode="reflect")
    pos = (np.arange(size, dtype=np.float64) + 0.5) * grid / size - 0.5
    weights = np.exp(-0.5 * ((pos[:, None] - np.arange(grid)[None, :]) / sigma) ** 2)
    weights = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
    field = weights @ coarse @ weights.T
    field -= field.mean()
    field /= field.std() + 1e-6
    return field


def _lesion_run(rng: np.random.Generator, n: int) -> tuple[int, int]:
    """Contiguous run of slices in the middle part of an ``n``-slice volume (0-based, inclusive).

    The first and last slices are always left lesion-free.
    """
    run_min = max(1, round(0.25 * n))
    run_max = max(run_min, round(0.5 * n))
    length = min(int(rng.integers(run_min, run_max + 1)), n - 2)
    margin = max(1, math.floor(0.2 * n))
    start_hi = n - length - margin
    if start_hi < margin:
        start = (n - length) // 2
    else:
        start = int(rng.integers(margin, start_hi + 1))
    return start, start + length - 1


def make_phantom_volume(
    rng: np.random.Generator, n_slices: int, image_size: int, has_lesion: bool
) -> PhantomVolume:
    """Generate one phantom patient (images, masks and lesion run) in memory."""
    if n_slices < _MIN_SLICES:
        raise ValueError(f"n_slices must be >= {_MIN_SLICES}, got {n_slices}")
    n, size = int(n_slices), int(image_size)
    f32 = np.float32

    # --- patient-level geometry -------------------------------------------------------------
    cx = size / 2 + rng.uniform(-0.03, 0.03) * size
    cy = size / 2 + rng.uniform(-0.03, 0.03) * size
    semi_x = rng.uniform(0.33, 0.38) * size  # brain half-width at the widest slice
    semi_y = rng.uniform(0.40, 0.45) * size  # brain half-height (axial brains are taller)
    theta = rng.uniform(-0.14, 0.14)
    rim_px = max(1.5, rng.uniform(0.025, 0.035) * size)
    gain = rng.uniform(0.92, 1.08, size=3).astype(f32)

    t = (np.arange(n, dtype=f32) + 0.5) / n
    scale = (0.45 + 0.55 * np.sin(np.pi * t) ** 0.6).astype(f32)  # grows then shrinks
    s3 = scale[:, None, None]

    yy, xx = np.mgrid[0:size, 0:size].astype(f32)
    dx, dy = xx - f32(cx), yy - f32(cy)
    cos_t, sin_t = f32(math.cos(theta)), f32(math.sin(theta))
    px = dx * cos_t + dy * sin_t  # brain-aligned frame
    py = -dx * sin_t + dy * cos_t

    r = np.sqrt((px / f32(semi_x) / s3) ** 2 + (py / f32(semi_y) / s3) ** 2)  # (n, H, W)
    rim_width = (rim_px / (0.5 * (semi_x + semi_y) * scale))[:, None, None]
    brain = r < 1.0
    rim = (r >= 1.0) & (r < 1.0 + rim_width)

    # --- ventricles (central slices only) ----------------------------------------------------
    vf = np.clip((scale - 0.78) / 0.22, 0.0, 1.0)[:, None, None]
    vsafe = np.maximum(vf, 1e-3)
    vent = np.zeros_like(brain)
    for side in (-1.0, 1.0):
        vx = (px - f32(side * 0.07 * size) * s3) / (f32(0.035 * size) * vsafe)
        vy = (py + f32(0.03 * size)) / (f32(0.11 * size) * vsafe)
        vent |= (vx**2 + vy**2 < 1.0) & (vf > 0.05)
    vent &= brain

    # --- lesion ------------------------------------------------------------------------------
    lesion = np.zeros_like(brain)
    rho2 = np.ones(brain.shape, dtype=f32)
    lesion_slices: tuple[int, int] | None = None
    flair_delta = f32(0.0)
    if has_lesion:
        first, last = _lesion_run(rng, n)
        lesion_slices = (first, last)
        length = last - first + 1
        la = rng.uniform(0.09, 0.14) * size
        lb = rng.uniform(0.09, 0.14) * size
        phi = rng.uniform(0.0, np.pi)
        s_min = float(scale[first : last + 1].min())
        room_x = max(0.0, semi_x * s_min - 1.1 * max(la, lb) - rim_px)
        room_y = max(0.0, semi_y * s_min - 1.1 * max(la, lb) - rim_px)
        ox = rng.uniform(-0.6, 0.6) * room_x
        oy = rng.uniform(-0.6, 0.6) * room_y
        lx = px - f32(ox)
        ly = py - f32(oy)
        cphi, sphi = f32(math.cos(phi)), f32(math.sin(phi))
        qa = (lx * cphi + ly * sphi) / f32(la)
        qb = (-lx * sphi + ly * cphi) / f32(lb)
        q2 = qa**2 + qb**2  # (H, W)
        k = np.arange(length, dtype=f32)
        u = (k + 0.5) / length - 0.5
        cross = 1.0 - 0.65 * (2.0 * u) ** 2  # squared cross-section radius, >= 0.35
        rho2[first : last + 1] = q2[None] / cross[:, None, None]
        lesion[first : last + 1] = rho2[first : last + 1] < 1.0
        lesion &= r < 0.97
        flair_delta = f32(rng.uniform(70.0, 100.0))

    # --- intensities -------------------------------------------------------------------------
    texture = 0.75 * _smooth_field(rng, n, size, max(6, size // 16), 1.2)
    texture += 0.45 * _smooth_field(rng, n, size, max(8, size // 5), 0.8)
    texture /= texture.std() + 1e-6
    head = brain | rim
    background = ~head
    core = f32(0.85) + f32(0.15) * np.clip(1.0 - rho2, 0.0, 1.0) if has_lesion else None
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for c in range(3):  # per channel on (n, H, W) arrays: much faster than 4-D broadcasting
        noise = rng.standard_normal((n, size, size), dtype=f32)
        base = _TISSUE[c] * gain[c]
        tissue = base + _TEXTURE_AMP[c] * texture
        tissue = np.where(vent, tissue * _VENTRICLE_FACTOR[c], tissue)
        if core is not None:
            shift = flair_delta if c == 1 else _LESION_SHIFT_OTHER[c]
            lesion_val = base + 0.5 * _TEXTURE_AMP[c] * texture + shift * core
            tissue = np.where(lesion, lesion_val, tissue)
        rim_val = _RIM[c] * gain[c] + 0.5 * _TEXTURE_AMP[c] * texture
        chan = np.where(brain, tissue, np.where(rim, rim_val, f32(0.0)))
        chan = np.where(head, chan + f32(_NOISE_SIGMA) * noise, chan)
        chan = ndimage.gaussian_filter(chan, sigma=(0.0, 0.6, 0.6), truncate=3.0)
        chan = np.where(background & (chan < 1.0), np.abs(noise) * f32(0.8), chan)
        images[..., c] = np.clip(np.rint(chan), 0, 255).astype(np.uint8)
    masks = np.where(lesion, np.uint8(255), np.uint8(0)).astype(np.uint8)
    return PhantomVolume(images=images, masks=masks, lesion_slices=lesion_slices)


def _params(
    num_patients: int,
    slices_per_patient: tuple[int, int],
    image_size: int,
    tumour_free_patients: float,
    seed: int,
) -> dict[str, Any]:
    return {
        "num_patients": int(num_patients),
        "slices_per_patient": [int(slices_per_patient[0]), int(slices_per_patient[1])],
        "image_size": int(image_size),
        "tumour_free_patients": float(tumour_free_patients),
        "seed": int(seed),
    }


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(root: Path, params: dict[str, Any]) -> bool:
    """True when ``root`` holds a finished data set written with exactly ``params``."""
    marker = _read_marker(root)
    if marker is None:
        return False
    if marker.get("format_version") != FORMAT_VERSION or marker.get("params") != params:
        return False
    patients = marker.get("patients")
    if not isinstance(patients, dict) or len(patients) != params["num_patients"]:
        return False
    for name, n_slices in patients.items():
        folder = root / name
        if not isinstance(n_slices, int) or not folder.is_dir():
            return False
        for i in range(1, n_slices + 1):
            if not (folder / f"{name}_{i}.tif").is_file():
                return False
            if not (folder / f"{name}_{i}_mask.tif").is_file():
                return False
    return True


def _own_patient_folder(folder: Path) -> bool:
    """Whether ``folder`` is a phantom patient folder: a ``SYN_P###_20000101`` folder (not a
    link) holding only files named like this generator's slices and masks."""
    if not PATIENT_NAME_RE.match(folder.name) or folder.is_symlink() or not folder.is_dir():
        return False
    name = re.compile(rf"^{re.escape(folder.name)}_\d+(_mask)?\.tif$")
    return all(name.match(f.name) and f.is_file() and not f.is_symlink() for f in folder.iterdir())


def _own_readme(path: Path) -> bool:
    try:
        return path.read_text(encoding="utf-8").splitlines()[:1] == [_README_HEADER]
    except (OSError, UnicodeDecodeError):
        return False


def foreign_entries(root: str | Path) -> list[Path]:
    """The entries of ``root`` (hidden ones included) that this generator did not write: all but
    the marker, its README, the ``SYN_P###_20000101`` patient folders holding only phantom
    slices, and what an interrupted write of the marker or README leaves. Empty for a folder
    that does not exist yet. Sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        if entry.is_symlink():
            found.append(entry)
        elif entry.name == MARKER_NAME or is_atomic_temporary(entry.name, _OWN_FILES):
            if not entry.is_file():
                found.append(entry)
        elif entry.name == README_NAME:
            if not (entry.is_file() and _own_readme(entry)):
                found.append(entry)
        elif not _own_patient_folder(entry):
            found.append(entry)
    return found


def _refuse_foreign(root: Path) -> None:
    foreign = foreign_entries(root)
    if foreign:
        held = names_and_more([f"'{path}'" for path in foreign], 1)
        raise ConfigError(
            f"Refusing to write synthetic phantoms into '{root}': it holds {held}, "
            "which tlunet's phantom generator did not write. Phantoms are written only into an "
            "empty folder or one holding tlunet's own phantoms; nothing was changed."
        )


def _with_defaults(settings: Any) -> dict[str, Any]:
    """``settings`` (a mapping of :data:`SETTINGS`) with :func:`write_synthetic_dataset`'s
    default for each one it lacks, as the generator reads them."""
    signature = inspect.signature(write_synthetic_dataset).parameters
    return {
        name: settings[name] if name in settings else signature[name].default for name in SETTINGS
    }


def holds_phantoms(root: str | Path, **settings: Any) -> bool:
    """Whether ``root`` holds the complete phantom set :func:`write_synthetic_dataset` writes
    with ``settings`` (its keyword arguments) and nothing else: then it can be read as it is."""
    root = Path(root)
    try:
        params = _params(**_with_defaults(settings))
    except (TypeError, ValueError, IndexError):
        return False
    return root.is_dir() and _is_complete(root, params) and not foreign_entries(root)


def phantom_folder_name(settings: Any) -> str:
    """The folder name ``data=synthetic`` gives the phantoms of ``settings`` (its
    ``data.synthetic`` node, or a checkpoint's) under ``<cache>/synthetic/``: the one definition
    (``conf/data/synthetic.yaml`` calls it through the resolver ``tlunet.phantom_folder``).

    A readable prefix (patients, size, seed) and a hash of every setting (:data:`SETTINGS`, as
    the generator reads them: a setting the node lacks is the generator's default, as
    ``data=synthetic`` writes them) and of :data:`FORMAT_VERSION`, e.g.
    ``p12_s256_seed0-1a2b3c4d``: two settings that give other phantoms never share a folder.
    A node that is no mapping, holds another key, or a value that is not a number raises
    :class:`~tlunet.errors.ConfigError` naming it (one line)."""
    if settings is None or not hasattr(settings, "keys"):
        raise ConfigError(
            f"data.synthetic is {settings!r}, not the phantoms' settings ({', '.join(SETTINGS)})."
        )
    unknown = [str(key) for key in settings.keys() if key not in SETTINGS]
    if unknown:
        raise ConfigError(
            f"data.synthetic holds {', '.join(unknown)}, not a setting of the phantoms "
            f"({', '.join(SETTINGS)})."
        )
    values = _with_defaults(settings)
    try:
        params = _params(**values)
    except (TypeError, ValueError, IndexError) as exc:
        shown = ", ".join(f"{name}={value!r}" for name, value in values.items())
        raise ConfigError(
            f"data.synthetic: {shown} cannot be read as the phantoms' settings ({exc})."
        ) from exc
    text = json.dumps({"format_version": FORMAT_VERSION, **params}, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"p{params['num_patients']}_s{params['image_size']}_seed{params['seed']}-{digest}"


def _clean(root: Path) -> None:
    """Delete the marker and the ``SYN_*`` patient folders this generator owns (nothing else)."""
    (root / MARKER_NAME).unlink(missing_ok=True)  # first, so an interrupted clean is detected
    for entry in sorted(root.iterdir()):
        if PATIENT_NAME_RE.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)


def _tumour_free_indices(rng: np.random.Generator, num_patients: int, fraction: float) -> set[int]:
    n_free = int(round(fraction * num_patients))
    if fraction > 0 and num_patients >= 3:
        n_free = max(n_free, 1)
    if fraction < 1:
        n_free = min(n_free, num_patients - 1)
    n_free = max(0, min(n_free, num_patients))
    return {int(i) for i in rng.choice(num_patients, size=n_free, replace=False)}


def _write_readme(root: Path, params: dict[str, Any]) -> None:
    text = (
        f"{_README_HEADER}\n\n"
        "These are **synthetic phantoms**, not patient data. They were generated by\n"
        "`tlunet.data.synthetic.write_synthetic_dataset` in the layout of the Kaggle LGG\n"
        "`kaggle_3m` set (`<patient>/<patient>_<n>.tif` RGB uint8 images with channels\n"
        "pre-contrast, FLAIR, post-contrast and `<patient>/<patient>_<n>_mask.tif` masks\n"
        "with values 0/255). Use them for smoke tests only; metrics on them mean nothing.\n\n"
        f"Parameters: `{json.dumps(params, sort_keys=True)}`\n"
    )
    write_text_atomic(root / README_NAME, text)


def plan_patients(
    num_patients: int,
    slices_per_patient: tuple[int, int],
    tumour_free_patients: float,
    seed: int,
) -> tuple[set[int], np.ndarray]:
    """The plan :func:`write_synthetic_dataset` follows: the indices of the tumour-free
    patients and the number of slices of each patient (without writing anything)."""
    lo, hi = (int(v) for v in slices_per_patient)
    plan_rng = np.random.default_rng(np.random.SeedSequence(int(seed)).spawn(1)[0])
    free = _tumour_free_indices(plan_rng, int(num_patients), float(tumour_free_patients))
    return free, plan_rng.integers(lo, hi + 1, size=int(num_patients))


def seed_for_total_slices(
    num_patients: int,
    slices_per_patient: tuple[int, int],
    total: int,
    tumour_free_patients: float = 0.2,
    max_seed: int = 100_000,
) -> int:
    """The smallest seed whose set has exactly ``total`` slices (e.g. 3929, the full kaggle_3m
    set's count, for benchmarks at the real data set's size)."""
    for seed in range(max_seed):
        counts = plan_patients(num_patients, slices_per_patient, tumour_free_patients, seed)[1]
        if int(counts.sum()) == total:
            return seed
    raise ValueError(
        f"No seed below {max_seed} gives {total} slices for {num_patients} patients of "
        f"{slices_per_patient[0]}..{slices_per_patient[1]} slices."
    )


def write_synthetic_dataset(
    root: str | Path,
    num_patients: int = 8,
    slices_per_patient: tuple[int, int] = (16, 24),
    image_size: int = 256,
    tumour_free_patients: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write phantom patients into ``root`` in the ``kaggle_3m`` layout and return ``root``.

    Args:
        root: output folder (created if needed): empty, or holding only what this generator
            writes (the ``SYN_P###_20000101`` folders of phantom slices, the marker
            ``.synthetic.json`` and its ``README.md``); a folder holding anything else raises
            :class:`~tlunet.errors.ConfigError` naming it, and nothing is written.
        num_patients: number of phantom patients (1..999).
        slices_per_patient: inclusive range the number of slices per patient is drawn from
            (uniformly); the lower bound must be >= 3.
        image_size: height and width of every slice in pixels (>= 32).
        tumour_free_patients: fraction of patients without any lesion (0..1). When positive
            and ``num_patients >= 3`` at least one patient is tumour-free; when below 1 at
            least one patient has a lesion.
        seed: seed of the numpy random generator; equal seeds give byte-identical files.
        overwrite: rewrite even if ``root`` already holds a complete data set with the same
            parameters.

    Returns:
        ``Path(root)``.
    """
    root = Path(root)
    lo, hi = (int(v) for v in slices_per_patient)
    if not 1 <= int(num_patients) <= 999:
        raise ValueError(f"num_patients must be in 1..999, got {num_patients}")
    if lo < _MIN_SLICES or hi < lo:
        raise ValueError(
            f"slices_per_patient must be (lo, hi) with {_MIN_SLICES} <= lo <= hi, "
            f"got {slices_per_patient}"
        )
    if int(image_size) < _MIN_SIZE:
        raise ValueError(f"image_size must be >= {_MIN_SIZE}, got {image_size}")
    if not 0.0 <= float(tumour_free_patients) <= 1.0:
        raise ValueError(f"tumour_free_patients must be in [0, 1], got {tumour_free_patients}")

    params = _params(num_patients, (lo, hi), image_size, tumour_free_patients, seed)
    _refuse_foreign(root)
    root.mkdir(parents=True, exist_ok=True)
    if not overwrite and _is_complete(root, params):
        return root
    _clean(root)

    n_pat = params["num_patients"]
    free, slice_counts = plan_patients(n_pat, (lo, hi), params["tumour_free_patients"], seed)
    patient_seqs = np.random.SeedSequence([int(seed), 1]).spawn(n_pat)

    patients: dict[str, int] = {}
    lesions: dict[str, list[int] | None] = {}
    for idx in range(n_pat):
        name = patient_name(idx + 1)
        vol = make_phantom_volume(
            np.random.default_rng(patient_seqs[idx]),
            int(slice_counts[idx]),
            params["image_size"],
            has_lesion=idx not in free,
        )
        folder = root / name
        folder.mkdir()
        for k in range(vol.images.shape[0]):
            tifffile.imwrite(folder / f"{name}_{k + 1}.tif", vol.images[k], photometric="rgb")
            tifffile.imwrite(
                folder / f"{name}_{k + 1}_mask.tif", vol.masks[k], photometric="minisblack"
            )
        patients[name] = int(vol.images.shape[0])
        run = vol.lesion_slices
        lesions[name] = None if run is None else [run[0] + 1, run[1] + 1]  # 1-based slice numbers

    _write_readme(root, params)
    marker = {
        "format_version": FORMAT_VERSION,
        "generator": "tlunet.data.synthetic",
        "params": params,
        "patients": patients,
        "lesion_slices": lesions,
    }
    write_json_atomic(root / MARKER_NAME, marker)  # last: its presence means "complete"
    return root


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tlunet.data.synthetic",
        description="Write synthetic LGG phantoms in the Kaggle kaggle_3m layout.",
    )
    parser.add_argument("out_dir", type=Path, help="output folder")
    parser.add_argument("--patients", type=int, default=8, help="number of patients")
    parser.add_argument("--min-slices", type=int, default=16, help="fewest slices per patient")
    parser.add_argument("--max-slices", type=int, default=24, help="most slices per patient")
    parser.add_argument("--size", type=int, default=256, help="slice height and width (px)")
    parser.add_argument(
        "--tumour-free", type=float, default=0.2, help="fraction of tumour-free patients"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--overwrite", action="store_true", help="rewrite even if up to date")
    args = parser.parse_args(argv)
    try:
        root = write_synthetic_dataset(
            args.out_dir,
            num_patients=args.patients,
            slices_per_patient=(args.min_slices, args.max_slices),
            image_size=args.size,
            tumour_free_patients=args.tumour_free,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except (TlunetError, ValueError) as exc:  # a folder of someone else's, impossible settings
        print(f"tlunet error: {exc}", file=sys.stderr)
        return 1
    marker = _read_marker(root) or {}
    n_slices = sum((marker.get("patients") or {}).values())
    print(f"synthetic data set at {root}: {args.patients} patients, {n_slices} slices")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
