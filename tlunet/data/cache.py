"""Decode the TIFFs of an index once, keep them as two compact uint8 arrays.

``images``: (N, H, W, 3) uint8, ``masks``: (N, H, W) uint8 with values {0, 1}.
With a cache folder the arrays are written as ``.npy`` files under a key derived from every
file's relative path, size, modification time, status-change time (ctime) and inode number, then
memory-mapped: later epochs, later runs and every DataLoader worker share them without
re-reading a TIFF. A changed, added or removed file changes the key, so a stale cache is never
used: a file replaced by one of the same name, size and modification time (``cp -p``,
``rsync -a``, an unpacked archive) still has a new ctime (any write or replacement sets it, no
program can set it back) or a new inode. Only stat calls: the warm start reads no TIFF; the
price is a rebuild after a change of the files' metadata alone (``chmod``, ``chown``, a new
hard link). ``meta.json`` stores an xxh3-128 checksum
of each array's bytes, checked when a process opens the cache: a cache whose bytes were changed
after it was built (bit rot, another tool writing into it) is logged with one warning and
rebuilt from the files, never used. A cache verified within the hour whose files have not been
written since (their ctime) is not hashed again (docs/reliability.md: what the check costs).

``on_error="skip"`` drops every slice whose image or mask cannot be used (unreadable, wrong
shape, dtype or values, a size different from most slices) and lists it in
``DecodedSlices.skipped``; its cache has its own key and remembers the skipped files.

A cache is built in a temporary folder ``<key>.tmp-<host>-<pid>-<hex>`` renamed into place when
complete. A build that was killed leaves its temporary behind: the next decode into the same
cache folder removes it when it names this host and a process that is gone (a live build is
never touched); one of another host, or of an older tlunet (``<key>.tmp-<hex>``), is removed
once nothing in it was written for :data:`STALE_AFTER_S`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
import xxhash

from tlunet.data.index import SliceRecord, problem
from tlunet.errors import ConfigError, DataError
from tlunet.utils import progress, write_error, write_json_atomic

log = logging.getLogger(__name__)

CACHE_FORMAT = 3  # 2: checksums in meta.json; 3: the key covers ctime and inode
#: The checksum of the cached arrays: xxh3-128 hashes 1 GiB in 0.044 s here, blake2b in 1.38 s
#: (a 3929-slice cache is 1.03 GB; figures in docs/reliability.md).
CHECKSUM = "xxh3_128"
_ARRAYS = ("images", "masks")
#: What to do with a slice that cannot be used: stop the run, or drop the slice and list it.
ON_ERRORS = ("raise", "skip")


@dataclass
class DecodedSlices:
    """The decoded arrays of an index, row ``i`` being ``records[kept[i]]``.

    ``kept`` lists the rows of the decoded records in order (all of them unless slices were
    skipped); ``skipped`` holds one ``{"path", "reason"}`` per dropped slice.
    """

    images: np.ndarray  # (N, H, W, 3) uint8
    masks: np.ndarray  # (N, H, W) uint8 in {0, 1}
    kept: list[int] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

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
    """Read one mask as (H, W) uint8 in {0, 1} (from 0/255 or 0/1 on disk), or raise
    :class:`DataError` naming ``path``.

    A mask saved with channels, (H, W, 1) or (H, W, 3) (RGB), is read when its channels are
    equal (a grey mask saved as RGB); channels that differ (the label in one of them) are
    refused, with each channel's count of non-zero pixels, rather than guessed."""
    try:
        arr = tifffile.imread(path)
    except Exception as exc:
        raise DataError(f"Cannot read mask '{path}': {exc}") from exc
    if arr.size == 0:
        raise DataError(f"Cannot read mask '{path}': empty or corrupt TIFF.")
    if arr.ndim == 3 and arr.shape[-1] in (1, 3):
        differ = any(not np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, arr.shape[-1]))
        if differ:
            counts = ", ".join(
                str(int(np.count_nonzero(arr[..., c]))) for c in range(arr.shape[-1])
            )
            raise DataError(
                f"Mask '{path}' has {arr.shape[-1]} channels that differ (non-zero pixels per "
                f"channel: {counts}): which one holds the label cannot be told; save the mask "
                "as one grey channel (0 and 255)."
            )
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise DataError(f"Mask '{path}' has shape {arr.shape}; expected (H, W).")
    values = np.unique(arr)
    if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
        raise DataError(
            f"Mask '{path}' holds values {values[:10].tolist()}; expected only 0 and 255 (or 0 and 1)."
        )
    return (arr > 0).astype(np.uint8)


def cache_key(records: Sequence[SliceRecord], root: Path, on_error: str = "raise") -> str:
    """Hash of every file's path relative to ``root``, size, mtime, ctime and inode number,
    and the cache format: a file replaced or rewritten since, even with its name, size and
    mtime kept, gives another key (see the module's docstring).

    A ``skip`` cache also hashes the mode and the resolved root: it stores the skipped files'
    paths, which must stay those of this folder. A file that cannot be stat'ed (removed since
    it was indexed) raises :class:`DataError` naming it.
    """
    h = hashlib.sha256(f"tlunet-cache-v{CACHE_FORMAT}".encode())
    if on_error != "raise":
        h.update(f"on_error={on_error}|{Path(root).resolve()}\n".encode())
    for r in records:
        for p in (r.image_path, r.mask_path):
            try:
                st = p.stat()
            except OSError as exc:
                raise DataError(f"Cannot read '{p}': {exc.strerror or exc}.") from exc
            h.update(
                f"{p.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}|"
                f"{st.st_ctime_ns}|{st.st_ino}\n".encode()
            )
    return h.hexdigest()[:24]


def _decode_into(records: Sequence[SliceRecord], images: np.ndarray, masks: np.ndarray) -> None:
    shape = images.shape[1:3]
    for i, r in enumerate(progress(records, "Decoding slices")):
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


@dataclass
class SliceScan:
    """What reading every slice of an index found (see :func:`scan_slices`)."""

    kept: list[int]  # rows of the records that read cleanly and have the common size
    problems: list[dict[str, str]]  # {"path", "reason"} per dropped slice, in record order
    shape: tuple[int, int] | None  # the common (H, W); None when no slice could be read
    has_tumour: list[bool]  # per kept row
    arrays: list[tuple[np.ndarray, np.ndarray]] | None  # per kept row, when keep_arrays


def scan_slices(records: Sequence[SliceRecord], keep_arrays: bool = False) -> SliceScan:
    """Read every slice of ``records`` without stopping at a problem.

    A slice is dropped, with a problem naming the offending file, when its image or mask cannot
    be read or is malformed (:func:`read_image`, :func:`read_mask`), when its mask's size
    differs from its image's, or when its size differs from the most common one (ties: the
    first seen). ``keep_arrays`` keeps the decoded (image, mask) of each kept row.
    """
    found: list[tuple[int, dict[str, str]]] = []
    # (row, image (H, W), mask shape, has tumour, arrays when kept): no arrays held otherwise
    read: list[tuple[int, tuple[int, ...], tuple[int, ...], bool, tuple | None]] = []
    for i, r in enumerate(progress(records, "Reading slices")):
        path = r.image_path
        try:
            img = read_image(path)
            path = r.mask_path
            msk = read_mask(path)
        except DataError as exc:
            found.append((i, problem(path, str(exc))))
            continue
        arrays = (img, msk) if keep_arrays else None
        read.append((i, img.shape[:2], msk.shape, bool(msk.any()), arrays))
    counts = Counter(entry[1] for entry in read)
    shape = max(counts, key=counts.__getitem__) if counts else None
    kept: list[tuple[int, bool, tuple[np.ndarray, np.ndarray] | None]] = []
    for i, size, mask_shape, tumour, arrays in read:
        r = records[i]
        if size != shape:
            reason = (
                f"Image '{r.image_path}' is {size[0]}x{size[1]}, but {counts[shape]} of "
                f"{len(read)} slices are {shape[0]}x{shape[1]}: all slices must share one size."
            )
            found.append((i, problem(r.image_path, reason)))
        elif mask_shape != size:
            reason = (
                f"Mask '{r.mask_path}' is {mask_shape[0]}x{mask_shape[1]} but its image is "
                f"{size[0]}x{size[1]}."
            )
            found.append((i, problem(r.mask_path, reason)))
        else:
            kept.append((i, tumour, arrays))
    found.sort(key=lambda t: t[0])
    return SliceScan(
        kept=[k[0] for k in kept],
        problems=[p for _, p in found],
        shape=shape,
        has_tumour=[k[1] for k in kept],
        arrays=[k[2] for k in kept] if keep_arrays else None,
    )


def array_checksum(arr: np.ndarray) -> str:
    """xxh3-128 hex digest of the bytes of ``arr`` (C order), e.g. a memory-mapped array."""
    h = xxhash.xxh3_128()
    flat = arr.reshape(-1)
    step = 64 << 20  # 64 MB at a time: a memory map is read through, never copied whole
    for start in range(0, flat.size, step):
        h.update(np.ascontiguousarray(flat[start : start + step]).data)
    return h.hexdigest()


def _allocate(path: Path) -> None:
    """Reserve the disk blocks of the (sparse) ``path``: a full disk then fails here with an
    ``OSError``, not later with a SIGBUS while the memory map is filled."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise OSError(exc.errno, exc.strerror, str(path)) from exc


def _build_cache(
    folder: Path,
    shape: tuple[int, int, int],
    fill: Callable[[np.ndarray, np.ndarray], None],
    meta: dict,
) -> tuple[np.ndarray, np.ndarray]:
    """Write (N, H, W, 3) images and (N, H, W) masks filled by ``fill`` into ``folder``
    (through a temporary folder and a rename, ``meta.json`` last); return them memory-mapped."""
    tmp = folder.with_name(f"{folder.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    intact = f"the input slices are intact and no part of the cache was left in '{folder.parent}'"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (*shape, 3))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, shape)
        for name in ("images.npy", "masks.npy"):
            _allocate(tmp / name)
        fill(images, masks)
        images.flush()
        masks.flush()
        pending = _begin_stamp(tmp)
        checksums = {"images": array_checksum(images), "masks": array_checksum(masks)}
        del images, masks
        meta = {**meta, "checksum": CHECKSUM, "checksums": checksums}
        write_json_atomic(tmp / "meta.json", meta, intact)
        _commit_stamp(pending, matched=True)
        try:
            os.replace(tmp, folder)
        except OSError as exc:  # another process built the same cache meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
            if not (folder / "meta.json").exists():
                raise write_error(folder, exc, "the input slices are intact") from exc
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(Path(exc.filename) if exc.filename else tmp, exc, intact) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return np.load(folder / "images.npy", mmap_mode="r"), np.load(
        folder / "masks.npy", mmap_mode="r"
    )


def _host() -> str:
    """This host as the temporaries of a cache build name it: the host name and, on Linux, the
    process-id namespace (containers that share a host name, ``docker --network host``, do not
    share pids), in the characters ``[A-Za-z0-9_.]``."""
    name = socket.gethostname() or "host"
    try:
        name += "." + re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass
    return re.sub(r"[^\w.]", "_", name)


#: This host (:func:`_host`), as the temporaries of a cache build carry it.
_HOST = _host()
#: ``<key>.tmp-<host>-<pid>-<hex>`` (an older tlunet's names hold no host and pid).
_TEMPORARY = re.compile(r"^[0-9a-f]{24}\.tmp-(?:(?P<host>.+)-(?P<pid>\d+)-)?[0-9a-f]{8}$")
#: A folder moved aside to be removed (:func:`_discard`): never read again.
_TRASH = re.compile(r"^[0-9a-f]{24}\.bad-[0-9a-f]{8}$")
#: A temporary whose owner cannot be asked (another host's, or an older tlunet's) is removed
#: once nothing in it was written for this long: a build writes its arrays continuously.
STALE_AFTER_S = 24 * 3600


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (a reused pid reads as alive: kept)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


def _last_write_s(folder: Path) -> float:
    """The latest modification time of ``folder`` and of the files in it (seconds)."""
    times = [folder.stat().st_mtime]
    for entry in os.scandir(folder):
        try:
            times.append(entry.stat(follow_symlinks=False).st_mtime)
        except OSError:
            pass
    return max(times)


def remove_stale_temporaries(cache_dir: str | Path) -> list[Path]:
    """Remove what killed builds left in ``cache_dir``; return the folders removed.

    A temporary ``<key>.tmp-<host>-<pid>-<hex>`` of this host whose process is gone is removed;
    one of a live process is left alone (it is being built). A temporary of another host, or of
    an older tlunet (``<key>.tmp-<hex>``: no owner in its name), is removed once nothing in it was
    written for :data:`STALE_AFTER_S`. Folders moved aside for removal (``<key>.bad-<hex>``)
    are removed. Anything else in ``cache_dir`` is never touched."""
    folder = Path(cache_dir).expanduser()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []  # no cache folder yet
    removed = []
    for entry in entries:
        path = Path(entry.path)
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            match = _TEMPORARY.match(entry.name)
            if match is not None:
                host, pid = match.group("host"), match.group("pid")
                if host == _HOST:
                    stale = not _process_alive(int(pid))
                    why = f"its process {pid} is gone"
                else:
                    stale = time.time() - _last_write_s(path) > STALE_AFTER_S
                    why = f"not written for over {STALE_AFTER_S // 3600} hours"
            else:
                stale, why = bool(_TRASH.match(entry.name)), "a cache set aside for removal"
        except OSError:
            continue  # removed meanwhile (its build finished or another process cleaned it)
        if stale:
            log.info("Removing %s, left by a cache build that did not finish (%s)", path, why)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def check_folder(path: str | Path, what: str, advice: str) -> Path:
    """``path`` (``~`` expanded), or :class:`ConfigError` when it, or the nearest of its parents
    that exists, is not a folder (a file, a broken link) so that nothing can be created in it:
    one line naming ``what`` (the setting), the path and the culprit, then ``advice``."""
    path = Path(path).expanduser()
    for part in (path, *path.parents):
        if part.is_dir():
            return path
        if part.exists() or part.is_symlink():
            kind = "a file" if part.exists() else "a broken link"
            if part == path:
                raise ConfigError(f"{what} '{path}' is {kind}, not a folder. {advice}")
            raise ConfigError(
                f"{what} '{path}' cannot be created: '{part}' is {kind}, not a folder. {advice}"
            )
    return path


def _discard(folder: Path, inode: int | None = None) -> None:
    """Remove a cache folder: renamed away first (atomic), and only while it is still the folder
    that was judged (``inode``), so that a good cache another process rebuilt under the same
    name meanwhile is left alone."""
    try:
        if inode is not None and os.stat(folder).st_ino != inode:
            return  # replaced by another process's rebuild
    except OSError:
        return
    trash = folder.with_name(f"{folder.name}.bad-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(folder, trash)
    except OSError:
        return  # gone already (another process discarded it)
    shutil.rmtree(trash, ignore_errors=True)


#: A cache verified less than this long ago whose files did not change since is not hashed
#: again. The stamp is a file whose modification time is the start of the verification, set by
#: the file system's clock like the files' ctimes (a shared cache on a file server compares
#: the server's times with each other); "changed" is a ctime (moved by any write, even one
#: that puts the modification time back) later than ``stamp - CTIME_MARGIN_NS`` (file times
#: follow the kernel's coarse clock). Figures: docs/reliability.md.
VERIFY_EVERY_S = 3600
CTIME_MARGIN_NS = 2_000_000_000
_STAMP = "verified"
_FILES = ("images.npy", "masks.npy", "meta.json")


def _recently_verified(folder: Path) -> bool:
    """Whether ``folder``'s stamp says it was verified within :data:`VERIFY_EVERY_S` and none of
    its files changed since."""
    try:
        stamp = (folder / _STAMP).stat().st_mtime_ns
        changed = max((folder / name).stat().st_ctime_ns for name in _FILES)
    except OSError:
        return False
    age = time.time_ns() - stamp
    return changed < stamp - CTIME_MARGIN_NS and -CTIME_MARGIN_NS < age < VERIFY_EVERY_S * 10**9


def _begin_stamp(folder: Path) -> Path | None:
    """A new stamp file for a verification that starts now (its modification time), made
    :func:`_commit_stamp` once the checksums match; None when the folder is read-only (the
    cache is then verified at every open)."""
    pending = folder / f".{_STAMP}-{uuid.uuid4().hex[:8]}"
    try:
        pending.write_bytes(b"")
    except OSError:
        return None
    return pending


def _commit_stamp(pending: Path | None, matched: bool) -> None:
    if pending is None:
        return
    try:
        if matched:
            os.replace(pending, pending.parent / _STAMP)  # keeps the start time
        else:
            pending.unlink()
    except OSError:
        pass


def _load_cache(folder: Path) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """The memory-mapped arrays and meta of a finished cache folder whose checksums match, or
    None (after one warning and removing it, when it exists but is unreadable or changed)."""
    if not (folder / "meta.json").exists():
        return None
    inode = None
    try:
        inode = os.stat(folder).st_ino
        meta = json.loads((folder / "meta.json").read_text())
        images = np.load(folder / "images.npy", mmap_mode="r")
        masks = np.load(folder / "masks.npy", mmap_mode="r")
        stored = meta.get("checksums") if meta.get("checksum") == CHECKSUM else None
        if isinstance(stored, dict) and _recently_verified(folder):
            return images, masks, meta
        if not isinstance(stored, dict):
            reason = "its meta.json holds no checksums (an older tlunet built it)"
        else:
            pending = _begin_stamp(folder)  # before hashing: a write meanwhile is after it
            changed = [
                name
                for name, arr in zip(_ARRAYS, (images, masks), strict=True)
                if stored.get(name) != array_checksum(arr)
            ]
            _commit_stamp(pending, matched=not changed)
            if not changed:
                return images, masks, meta
            reason = (
                f"{' and '.join(f'{n}.npy' for n in changed)} changed since it was built "
                "(checksum mismatch: a disk error, or another program wrote into it)"
            )
        del images, masks
    except (OSError, ValueError) as exc:
        reason = f"unreadable ({exc})"
    log.warning("Decoded-slice cache %s: %s; rebuilding it from the slices", folder, reason)
    _discard(folder, inode)
    return None


def decode_slices(
    records: Sequence[SliceRecord],
    root: str | Path,
    cache_dir: str | Path | None = None,
    on_error: str = "raise",
) -> DecodedSlices:
    """Decode ``records`` (in order), through the on-disk cache when ``cache_dir`` is given.

    ``on_error="raise"``: the first unusable slice raises :class:`DataError` naming its file.
    ``on_error="skip"``: unusable slices are dropped (``kept``/``skipped`` of the result);
    :class:`DataError` only when none is left. A ``cache_dir`` that is (or lies under) a file
    raises :class:`ConfigError`; the temporaries killed builds left in it are removed first
    (:func:`remove_stale_temporaries`).
    """
    if on_error not in ON_ERRORS:
        raise ConfigError(
            f"data.on_error='{on_error}' is unknown; choose one of {list(ON_ERRORS)}."
        )
    if not records:
        raise DataError(f"No slices to decode under '{root}'.")
    root = Path(root)
    if cache_dir is not None:
        cache_dir = check_folder(
            cache_dir,
            "The decoded-slice cache folder (data.cache_dir)",
            "Remove it, or set data.cache_dir (or TLUNET_CACHE_DIR, for tlunet's whole cache) "
            "to a folder; data.cache_dir=null decodes into memory.",
        )
        remove_stale_temporaries(cache_dir)
    if on_error == "skip":
        return _decode_skipping(records, root, cache_dir)
    first = read_image(records[0].image_path)
    shape = (len(records), *first.shape[:2])
    kept = list(range(len(records)))
    if cache_dir is None:
        images = np.empty((*shape, 3), np.uint8)
        masks = np.empty(shape, np.uint8)
        _decode_into(records, images, masks)
        return DecodedSlices(images, masks, kept)

    folder = Path(cache_dir).expanduser() / cache_key(records, root)
    cached = _load_cache(folder)
    if cached is not None:
        images, masks, _ = cached
        if images.shape == (*shape, 3) and masks.shape == shape:
            log.info("Using decoded-slice cache %s", folder)
            return DecodedSlices(images, masks, kept)
        _discard(folder)

    log.info("Decoding %d slices from %s into cache %s", len(records), root, folder)
    meta = {"format": CACHE_FORMAT, "root": str(root), "num_slices": len(records)}
    images, masks = _build_cache(folder, shape, lambda im, ms: _decode_into(records, im, ms), meta)
    return DecodedSlices(images, masks, kept)


def _decode_skipping(
    records: Sequence[SliceRecord], root: Path, cache_dir: str | Path | None
) -> DecodedSlices:
    folder = None
    if cache_dir is not None:
        folder = Path(cache_dir).expanduser() / cache_key(records, root, "skip")
        cached = _load_cache(folder)
        if cached is not None:
            images, masks, meta = cached
            kept, skipped = meta.get("kept"), meta.get("skipped")
            if (
                isinstance(kept, list)
                and isinstance(skipped, list)
                and images.shape[0] == len(kept) == masks.shape[0]
                and images.shape[1:3] == masks.shape[1:]
                and all(0 <= i < len(records) for i in kept)
            ):
                log.info("Using decoded-slice cache %s (%d skipped)", folder, len(skipped))
                return DecodedSlices(images, masks, kept, skipped)
            _discard(folder)

    scan = scan_slices(records, keep_arrays=True)
    if not scan.kept:
        raise DataError(
            f"None of the {len(records)} slices under '{root}' can be used "
            f"(data.on_error=skip skipped them all); the first: {scan.problems[0]['reason']}"
        )
    arrays = scan.arrays or []
    shape = (len(scan.kept), *scan.shape)

    def fill(images: np.ndarray, masks: np.ndarray) -> None:
        for row in range(len(arrays)):
            images[row], masks[row] = arrays[row]
            arrays[row] = None  # free as we go: one copy of the set in memory at a time

    if folder is None:
        images = np.empty((*shape, 3), np.uint8)
        masks = np.empty(shape, np.uint8)
        fill(images, masks)
        return DecodedSlices(images, masks, scan.kept, scan.problems)
    log.info("Decoding %d slices from %s into cache %s", len(records), root, folder)
    meta = {
        "format": CACHE_FORMAT,
        "root": str(root),
        "num_slices": len(scan.kept),
        "on_error": "skip",
        "kept": scan.kept,
        "skipped": scan.problems,
    }
    images, masks = _build_cache(folder, shape, fill, meta)
    return DecodedSlices(images, masks, scan.kept, scan.problems)
