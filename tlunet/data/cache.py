"""Decode the TIFFs of an index once, keep them as two compact uint8 arrays.

``images``: (N, H, W, 3) uint8, ``masks``: (N, H, W) uint8 with values {0, 1}.
With a cache folder the arrays are written as ``.npy`` files under a key derived from every
file's relative path, size and modification time, then memory-mapped: later epochs, later runs
and every DataLoader worker share them without re-reading a TIFF. A changed, added or removed
file changes the key, so a stale cache is never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from tlunet.data.index import SliceRecord
from tlunet.errors import DataError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


@dataclass
class DecodedSlices:
    """The decoded arrays of an index, row ``i`` being ``records[i]``."""

    images: np.ndarray  # (N, H, W, 3) uint8
    masks: np.ndarray  # (N, H, W) uint8 in {0, 1}

    @property
    def has_tumour(self) -> np.ndarray:
        """(N,) bool: the slice's mask has at least one tumour pixel."""
        return self.masks.reshape(len(self.masks), -1).max(axis=1) > 0


def read_image(path: Path) -> np.ndarray:
    """Read one slice image as (H, W, 3) uint8, or raise :class:`DataError` naming ``path``."""
    try:
        arr = tifffile.imread(path)
    except Exception as exc:  # tifffile raises several types for corrupt files
        raise DataError(f"Cannot read image '{path}': {exc}") from exc
    if arr.size == 0:
        raise DataError(f"Cannot read image '{path}': empty or corrupt TIFF.")
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise DataError(
            f"Image '{path}' has shape {arr.shape}; expected (H, W, 3) with three channels "
            "(pre-contrast, FLAIR, post-contrast)."
        )
    if arr.dtype != np.uint8:
        raise DataError(f"Image '{path}' has dtype {arr.dtype}; expected uint8.")
    return arr


def read_mask(path: Path) -> np.ndarray:
    """Read one mask as (H, W) uint8 in {0, 1} (from 0/255 or 0/1 on disk)."""
    try:
        arr = tifffile.imread(path)
    except Exception as exc:
        raise DataError(f"Cannot read mask '{path}': {exc}") from exc
    if arr.size == 0:
        raise DataError(f"Cannot read mask '{path}': empty or corrupt TIFF.")
    if arr.ndim == 3 and arr.shape[-1] in (1, 3):
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise DataError(f"Mask '{path}' has shape {arr.shape}; expected (H, W).")
    values = np.unique(arr)
    if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
        raise DataError(
            f"Mask '{path}' holds values {values[:10].tolist()}; expected only 0 and 255 (or 0 and 1)."
        )
    return (arr > 0).astype(np.uint8)


def cache_key(records: Sequence[SliceRecord], root: Path) -> str:
    """Hash of every file's path relative to ``root``, size and mtime, and the cache format."""
    h = hashlib.sha256(f"tlunet-cache-v{CACHE_FORMAT}".encode())
    for r in records:
        for p in (r.image_path, r.mask_path):
            st = p.stat()
            h.update(f"{p.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _decode_into(records: Sequence[SliceRecord], images: np.ndarray, masks: np.ndarray) -> None:
    shape = images.shape[1:3]
    for i, r in enumerate(records):
        img = read_image(r.image_path)
        msk = read_mask(r.mask_path)
        if img.shape[:2] != shape:
            raise DataError(
                f"Image '{r.image_path}' is {img.shape[0]}x{img.shape[1]}, but the first slice "
                f"'{records[0].image_path}' is {shape[0]}x{shape[1]}: all slices must share one size."
            )
        if msk.shape != shape:
            raise DataError(
                f"Mask '{r.mask_path}' is {msk.shape[0]}x{msk.shape[1]} but its image is "
                f"{shape[0]}x{shape[1]}."
            )
        images[i] = img
        masks[i] = msk


def decode_slices(
    records: Sequence[SliceRecord], root: str | Path, cache_dir: str | Path | None = None
) -> DecodedSlices:
    """Decode ``records`` (in order), through the on-disk cache when ``cache_dir`` is given."""
    if not records:
        raise DataError(f"No slices to decode under '{root}'.")
    root = Path(root)
    first = read_image(records[0].image_path)
    shape = (len(records), *first.shape[:2])
    if cache_dir is None:
        images = np.empty((*shape, 3), np.uint8)
        masks = np.empty(shape, np.uint8)
        _decode_into(records, images, masks)
        return DecodedSlices(images, masks)

    folder = Path(cache_dir).expanduser() / cache_key(records, root)
    if (folder / "meta.json").exists():
        try:
            images = np.load(folder / "images.npy", mmap_mode="r")
            masks = np.load(folder / "masks.npy", mmap_mode="r")
            if images.shape == (*shape, 3) and masks.shape == shape:
                log.info("Using decoded-slice cache %s", folder)
                return DecodedSlices(images, masks)
        except (OSError, ValueError) as exc:
            log.warning("Ignoring unreadable cache %s (%s); rebuilding it", folder, exc)
        shutil.rmtree(folder, ignore_errors=True)

    log.info("Decoding %d slices from %s into cache %s", len(records), root, folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (*shape, 3))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, shape)
        _decode_into(records, images, masks)
        images.flush()
        masks.flush()
        del images, masks
        meta = {"format": CACHE_FORMAT, "root": str(root), "num_slices": len(records)}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process built the same cache meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DecodedSlices(
        np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "masks.npy", mmap_mode="r")
    )
