"""Decode the TIFFs of an index once, keep them as two compact uint8 arrays.

``images``: (N, H, W, 3) uint8, ``masks``: (N, H, W) uint8 with values {0, 1}.
With a cache folder the arrays are written as ``.npy`` files under a key derived from every
file's path relative to the data root, size and modification time, then memory-mapped: later
epochs, later runs and every DataLoader worker share them without re-reading a TIFF. A changed,
added or removed file changes the key. A copy of the data set elsewhere (``rsync -a``, ``cp
-p``: same relative paths, sizes and modification times) shares its cache.

What the key cannot see, a file replaced by one of the same name, size and modification time
(``cp -p``, ``rsync -a``, an unpacked corrected release), the cache checks itself:
``meta.json`` holds an xxh3-64 hash of each file's bytes (taken from the bytes decoded into
the cache), and ``stamps.json`` the (ctime, inode) each file had when it was last seen with
those bytes. Any write or replacement moves a file's ctime (no program can set it back) or
changes its inode, so a process that opens the cache compares the stamps (the stat calls of
the key: a warm start reads no TIFF) and hashes only the files whose stamp changed: all with
their bytes unchanged (a copy, a ``chmod``, a remount) -> the cache is used and the new stamps
recorded; one changed -> one warning naming it, the cache is rebuilt. A cache keeps one set
of stamps: two copies of a data set used in turn hash their files at each change of copy.

``meta.json`` also stores an xxh3-128 checksum of each array's bytes, checked when a process
opens the cache: a cache whose bytes were changed after it was built (bit rot, another tool
writing into it) is logged with one warning and rebuilt from the files, never used. A cache
verified within the hour whose arrays have not been written since (their ctime) is not hashed
again (docs/reliability.md: what the check costs).

``on_error="skip"`` drops every slice whose image or mask cannot be used (unreadable, wrong
shape, dtype or values, a size different from most slices) and lists it in
``DecodedSlices.skipped``; its cache has its own key, which covers the data root too (it
remembers the skipped files by their paths).

A cache is built in a temporary folder ``<key>.tmp-<host>-<pid>-<hex>`` renamed into place when
complete. A build that was killed leaves its temporary behind: the next decode into the same
cache folder removes it when it names this host and a process that is gone (a live build is
never touched); one of another host, or of an older tlunet (``<key>.tmp-<hex>``), is removed
once nothing in it was written for :data:`STALE_AFTER_S` (:func:`remove_stale_builds`).

A process that uses a cache holds a read lock on its ``meta.json`` (``fcntl``) until it ends.
After a build, the other caches of the same data root and mode that were built from a file no
longer on disk as it was (``files.json``: what the key hashed) and that no process holds are
removed (:func:`remove_older_caches`). On a file system whose locks other machines may not see
(a network file system) nothing is removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
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
from tlunet.errors import ConfigError, DataError, WriteError
from tlunet.utils import atomic_path, check_folder, progress, write_error, write_json_atomic

try:
    import fcntl
except ImportError:  # not a POSIX system: caches are used without locks, none is removed
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: 2: checksums in meta.json; 3: the key covers ctime and inode; 4: the key covers each file's
#: relative path, size and mtime again, meta.json the hash of each file's bytes, stamps.json
#: their (ctime, inode).
CACHE_FORMAT = 4
#: The hash of each slice file's bytes in meta.json (a change detector, not a checksum of
#: the cache: xxh3-64 is enough and keeps meta.json small).
FILE_HASH = "xxh3_64"
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


def read_bytes(path: Path, what: str = "file") -> bytes:
    """The bytes of ``path``, or :class:`DataError` ``Cannot read <what> '<path>': ...``."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"Cannot read {what} '{path}': {exc}") from exc


def file_hash(data: bytes) -> str:
    """The :data:`FILE_HASH` of a file's bytes (hex), as ``meta.json`` stores it."""
    return xxhash.xxh3_64_hexdigest(data)


def read_image(path: Path, data: bytes | None = None) -> np.ndarray:
    """Read one slice image as (H, W, 3) uint8, or raise :class:`DataError` naming ``path``;
    ``data``: its bytes, when they were read already."""
    if data is None:
        data = read_bytes(path, "image")
    try:
        arr = tifffile.imread(io.BytesIO(data))
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


def read_mask(path: Path, data: bytes | None = None) -> np.ndarray:
    """Read one mask as (H, W) uint8 in {0, 1} (from 0/255 or 0/1 on disk), or raise
    :class:`DataError` naming ``path``; ``data``: its bytes, when they were read already.

    A mask saved with channels, (H, W, 1) or (H, W, 3) (RGB), is read when its channels are
    equal (a grey mask saved as RGB); channels that differ (the label in one of them) are
    refused, with each channel's count of non-zero pixels, rather than guessed."""
    if data is None:
        data = read_bytes(path, "mask")
    try:
        arr = tifffile.imread(io.BytesIO(data))
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


#: One slice file as the cache key sees it: its path and ``os.stat`` result.
FileStat = tuple[Path, os.stat_result]


def stat_files(records: Sequence[SliceRecord]) -> list[FileStat]:
    """The image and mask of each record, in this order, with their ``stat`` (links followed);
    a file that cannot be stat'ed (removed since it was indexed) raises :class:`DataError`
    naming it."""
    files = []
    for r in records:
        for p in (r.image_path, r.mask_path):
            try:
                files.append((p, p.stat()))
            except OSError as exc:
                raise DataError(f"Cannot read '{p}': {exc.strerror or exc}.") from exc
    return files


def _key(files: Sequence[FileStat], root: Path, on_error: str) -> str:
    h = hashlib.sha256(f"tlunet-cache-v{CACHE_FORMAT}".encode())
    if on_error != "raise":
        h.update(f"on_error={on_error}|{Path(root).resolve()}\n".encode())
    for rel, size, mtime_ns in _file_list(files, root):
        h.update(f"{rel}|{size}|{mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def cache_key(records: Sequence[SliceRecord], root: Path, on_error: str = "raise") -> str:
    """Hash of every file's path relative to ``root``, size and modification time, and the
    cache format: an edited, added or removed file gives another key, a copy of the data set
    elsewhere with its times kept (``rsync -a``, ``cp -p``) the same one. A file replaced with
    its name, size and mtime kept is caught by the cache's own check (the module's docstring).

    A ``skip`` cache also hashes the mode and the resolved root: it stores the skipped files'
    paths, which must stay those of this folder. A file that cannot be stat'ed (removed since
    it was indexed) raises :class:`DataError` naming it.
    """
    return _key(stat_files(records), Path(root), on_error)


def _file_list(files: Sequence[FileStat], root: Path) -> list[list]:
    """What the key hashes, per file: [path relative to ``root``, size, mtime]."""
    return [[p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns] for p, st in files]


def _stamps(files: Sequence[FileStat]) -> list[list[int]]:
    """What a replacement of each file cannot keep: its (ctime, inode)."""
    return [[st.st_ctime_ns, st.st_ino] for _, st in files]


def _decode_into(
    records: Sequence[SliceRecord], images: np.ndarray, masks: np.ndarray
) -> list[str | None]:
    """Decode ``records`` into ``images`` and ``masks``; return the :func:`file_hash` of each
    image and mask (in :func:`stat_files`' order) from the bytes decoded."""
    shape = images.shape[1:3]
    hashes: list[str | None] = []
    for i, r in enumerate(progress(records, "Decoding slices")):
        image_bytes = read_bytes(r.image_path, "image")
        mask_bytes = read_bytes(r.mask_path, "mask")
        img = read_image(r.image_path, image_bytes)
        msk = read_mask(r.mask_path, mask_bytes)
        hashes += [file_hash(image_bytes), file_hash(mask_bytes)]
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
    return hashes


@dataclass
class SliceScan:
    """What reading every slice of an index found (see :func:`scan_slices`)."""

    kept: list[int]  # rows of the records that read cleanly and have the common size
    problems: list[dict[str, str]]  # {"path", "reason"} per dropped slice, in record order
    shape: tuple[int, int] | None  # the common (H, W); None when no slice could be read
    has_tumour: list[bool]  # per kept row
    arrays: list[tuple[np.ndarray, np.ndarray]] | None  # per kept row, when keep_arrays
    #: The file_hash of each image and mask (stat_files' order); None for one not read
    hashes: list[str | None] = field(default_factory=list)


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
    hashes: list[str | None] = []
    for i, r in enumerate(progress(records, "Reading slices")):
        contents = []
        for path in (r.image_path, r.mask_path):
            try:
                contents.append(path.read_bytes())
            except OSError:
                contents.append(None)  # read again below, for the error's message
            hashes.append(None if contents[-1] is None else file_hash(contents[-1]))
        path = r.image_path
        try:
            img = read_image(path, contents[0])
            path = r.mask_path
            msk = read_mask(path, contents[1])
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
        hashes=hashes,
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
    fill: Callable[[np.ndarray, np.ndarray], Sequence[str | None]],
    meta: dict,
    files: Sequence[FileStat],
    root: Path,
) -> tuple[np.ndarray, np.ndarray]:
    """Write (N, H, W, 3) images and (N, H, W) masks filled by ``fill`` (which returns the
    :func:`file_hash` of each of ``files``, from the bytes it decoded) into ``folder`` (through a
    temporary folder and a rename, ``meta.json`` last); return them memory-mapped, the folder
    held by this process (:func:`_hold`)."""
    tmp = folder.with_name(f"{folder.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    intact = f"the input slices are intact and no part of the cache was left in '{folder.parent}'"
    held = None
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (*shape, 3))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, shape)
        for name in ("images.npy", "masks.npy"):
            _allocate(tmp / name)
        hashes = list(fill(images, masks))
        images.flush()
        masks.flush()
        pending = _begin_stamp(tmp)
        checksums = {"images": array_checksum(images), "masks": array_checksum(masks)}
        del images, masks
        write_json_atomic(tmp / _STAMPS, {"stamps": _stamps(files)}, intact)
        write_json_atomic(tmp / _FILE_LIST, {"files": _file_list(files, root)}, intact)
        meta = {
            **meta,
            "checksum": CHECKSUM,
            "checksums": checksums,
            "file_hash": FILE_HASH,
            "file_hashes": hashes,
        }
        write_json_atomic(tmp / "meta.json", meta, intact)
        _commit_stamp(pending, matched=True)
        held = _lock(tmp / "meta.json", exclusive=False, wait=False)  # held from its first use
        try:
            os.replace(tmp, folder)
        except OSError as exc:  # another process built the same cache meanwhile
            _close(held)
            held = None
            shutil.rmtree(tmp, ignore_errors=True)
            if _hold(folder) is None:
                raise write_error(folder, exc, "the input slices are intact") from exc
        else:
            _release(folder)  # a cache of this name this process held before (discarded)
            if held is not None:
                _HELD[folder] = held
    except OSError as exc:
        _close(held)
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(Path(exc.filename) if exc.filename else tmp, exc, intact) from exc
    except BaseException:
        _close(held)
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
#: A finished cache folder.
_KEY = re.compile(r"^[0-9a-f]{24}$")
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


def remove_stale_builds(cache_dir: str | Path) -> list[Path]:
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


def _discard(folder: Path, inode: int | None = None) -> None:
    """Remove a cache folder: renamed away first (atomic), and only while it is still the folder
    that was judged (``inode``), so that a good cache another process rebuilt under the same
    name meanwhile is left alone."""
    try:
        if inode is not None and os.stat(folder).st_ino != inode:
            return  # replaced by another process's rebuild
    except OSError:
        return
    _release(folder)
    trash = folder.with_name(f"{folder.name}.bad-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(folder, trash)
    except OSError:
        return  # gone already (another process discarded it)
    shutil.rmtree(trash, ignore_errors=True)


# -- which process uses which cache ---------------------------------------------------------
#: The caches this process uses: folder -> a descriptor of its ``meta.json`` holding a read
#: lock (``fcntl``: POSIX locks, which NFS passes to the server) until the process ends. The
#: file is never opened a second time by this process: closing any descriptor of a file
#: releases the process's POSIX locks on it.
_HELD: dict[Path, int] = {}
#: How long a process waits for a cache that another is removing (the rename's time).
_LOCK_WAIT_S = 10.0


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _lock(path: Path, exclusive: bool, wait: bool) -> int | None:
    """A descriptor of ``path`` with a read (or, ``exclusive``, write) lock; None when the
    file cannot be opened or the lock not had (another process holds a conflicting one, for
    :data:`_LOCK_WAIT_S` when ``wait``; or the file system has no locks: then a read lock is
    done without, and an exclusive one is never had)."""
    try:
        fd = os.open(path, os.O_RDWR if exclusive else os.O_RDONLY)
    except OSError:
        return None
    if fcntl is None:
        if exclusive:
            _close(fd)
            return None
        return fd
    deadline = time.monotonic() + (_LOCK_WAIT_S if wait else 0.0)
    while True:
        try:
            fcntl.lockf(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES) and not exclusive:
                return fd  # no locks on this file system: used unlocked (none is removed)
            if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                _close(fd)
                return None
        time.sleep(0.05)


def _file_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` is still the file open as ``fd`` (not renamed away or replaced)."""
    try:
        return _file_id(os.fstat(fd)) == _file_id(os.stat(path))
    except OSError:
        return False


def _hold(folder: Path) -> int | None:
    """This process's descriptor of ``folder``'s ``meta.json``, read-locked for the rest of the
    process so that :func:`remove_older_caches` of another process leaves the cache alone;
    None when the folder holds no ``meta.json`` (any more: removed meanwhile)."""
    meta = folder / "meta.json"
    fd = _HELD.get(folder)
    if fd is not None:
        if _same_file(fd, meta):
            return fd
        _release(folder)
    fd = _lock(meta, exclusive=False, wait=True)
    if fd is None:
        return None
    if not _same_file(fd, meta):  # removed while this process waited for the lock
        _close(fd)
        return None
    for other in [f for f, d in _HELD.items() if not _same_file(d, f / "meta.json")]:
        _release(other)  # caches removed since (a long process opens many): no descriptor kept
    _HELD[folder] = fd
    return fd


def _release(folder: Path) -> None:
    _close(_HELD.pop(folder, None))


def _read_json_fd(fd: int) -> dict:
    """The JSON object of the file open as ``fd`` (read from its start; ``ValueError`` when it
    is no JSON object)."""
    size = os.fstat(fd).st_size
    data = b""
    while len(data) < size:
        chunk = os.pread(fd, size - len(data), len(data))
        if not chunk:
            break
        data += chunk
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


#: The file systems on which a lock of one process is seen by every other process that can
#: open the file: the local ones (a process on another machine reaches them only through an
#: NFS export of this one, whose server takes the POSIX locks of its clients).
LOCAL_FILE_SYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "tmpfs", "overlay", "bcachefs"}
)


def _file_system(path: Path) -> str | None:
    """The type of the file system ``path`` is on (Linux: ``/proc/self/mountinfo``), or None."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
        path = path.resolve()
    except OSError:
        return None
    best, kind = -1, None
    for line in lines:
        fields = line.split()
        try:
            point = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]))
            fs = fields[fields.index("-") + 1]
        except (IndexError, ValueError):
            continue
        if path.is_relative_to(point) and len(point.parts) >= best:
            best, kind = len(point.parts), fs
    return kind


def _built_from_files_on_disk(folder: Path, root: Path) -> bool:
    """Whether every file the cache ``folder`` was built from (``files.json``: its key's
    relative path, size and mtime) is still under ``root`` with that size and mtime; also
    True when that cannot be told (no readable ``files.json``): then the cache is kept."""
    try:
        entries = json.loads((folder / _FILE_LIST).read_text()).get("files")
        for rel, size, mtime_ns in entries:
            try:
                st = (root / rel).stat()
            except OSError:
                return False
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                return False
    except (OSError, ValueError, TypeError, AttributeError):
        return True
    return True


def remove_older_caches(cache_dir: str | Path, kept: Path, root: Path, on_error: str) -> list[Path]:
    """After ``kept`` was built for ``root``: remove the other caches of this cache format,
    data root and mode (``meta.json``'s ``root`` and ``on_error``) that are obsolete and that
    no process uses; return the folders removed.

    Obsolete is a cache built from a file that is no longer under ``root`` with the relative
    path, size and mtime of its key (``files.json``): no process that indexes ``root`` now gets
    its key. In use is a cache whose ``meta.json`` another process holds a lock on
    (:func:`_hold`: every process that opened it, until it ends; a process that indexed the
    old files before the change and opens the cache later finds none, and builds one) or this
    process holds. Nothing is removed on a file system where the lock of a process on another
    machine may not be seen (not one of :data:`LOCAL_FILE_SYSTEMS`: NFS, Lustre, GPFS, ...,
    whose locks depend on mount options). Caches of other data roots (a copy elsewhere uses
    the caches of the root that built them), of the other mode, of other cache formats (another
    tlunet version may use them) and anything else in ``cache_dir`` are never touched."""
    folder = Path(cache_dir).expanduser()
    if fcntl is None or _file_system(folder) not in LOCAL_FILE_SYSTEMS:
        log.debug("Older caches in %s are left: its file system's locks may be local", folder)
        return []
    resolved = Path(root).resolve()
    held = set()
    for fd in _HELD.values():
        with contextlib.suppress(OSError):
            held.add(_file_id(os.fstat(fd)))
    removed = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        if not _KEY.match(entry.name) or entry.name == kept.name:
            continue
        try:  # by stat: opening (and closing) a file releases this process's locks on it
            if _file_id(os.stat(path / "meta.json")) in held:
                continue  # this process uses it
        except OSError:
            continue  # not a finished cache
        fd = _lock(path / "meta.json", exclusive=True, wait=False)
        if fd is None:
            continue  # in use (or not a finished cache: no meta.json)
        trash = path.with_name(f"{path.name}.bad-{uuid.uuid4().hex[:8]}")
        try:
            meta = _read_json_fd(fd)
            ours = (
                meta.get("format") == CACHE_FORMAT
                and meta.get("root") == str(resolved)
                and meta.get("on_error", "raise") == on_error
            )
            if not ours or not _same_file(fd, path / "meta.json"):
                continue
            if _built_from_files_on_disk(path, resolved):
                continue  # current: e.g. a cache of some of the root's slices
            os.replace(path, trash)  # under the lock: a process waiting for it then sees none
        except (OSError, ValueError):
            continue
        finally:
            _close(fd)
        log.info("Removing %s, the cache of an earlier state of %s", path, resolved)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path)
    return removed


#: A cache verified less than this long ago whose files did not change since is not hashed
#: again. The stamp is a file whose modification time is the start of the verification, set by
#: the file system's clock like the files' ctimes (a shared cache on a file server compares
#: the server's times with each other); "changed" is a ctime (moved by any write, even one
#: that puts the modification time back) later than ``stamp - CTIME_MARGIN_NS`` (file times
#: follow the kernel's coarse clock). Figures: docs/reliability.md.
VERIFY_EVERY_S = 3600
CTIME_MARGIN_NS = 2_000_000_000
_STAMP = "verified"
#: The (ctime, inode) of each slice file when it was last seen with the bytes meta.json hashes
#: (rewritten when they change and the bytes do not; not one of the files the stamp watches).
_STAMPS = "stamps.json"
#: What the key hashed, per file: [relative path, size, mtime] (read by remove_older_caches).
_FILE_LIST = "files.json"
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


def _changed_arrays(folder: Path, meta: dict, images: np.ndarray, masks: np.ndarray) -> str | None:
    """Why the arrays of ``folder`` are not those it was built with (checksums), or None;
    not hashed again within the hour of a verification (:func:`_recently_verified`)."""
    stored = meta.get("checksums") if meta.get("checksum") == CHECKSUM else None
    if not isinstance(stored, dict):
        return "its meta.json holds no checksums (an older tlunet built it)"
    if _recently_verified(folder):
        return None
    pending = _begin_stamp(folder)  # before hashing: a write meanwhile is after it
    changed = [
        name
        for name, arr in zip(_ARRAYS, (images, masks), strict=True)
        if stored.get(name) != array_checksum(arr)
    ]
    _commit_stamp(pending, matched=not changed)
    if not changed:
        return None
    return (
        f"{' and '.join(f'{n}.npy' for n in changed)} changed since it was built "
        "(checksum mismatch: a disk error, or another program wrote into it)"
    )


def _changed_file(folder: Path, meta: dict, files: Sequence[FileStat]) -> str | None:
    """Why ``folder`` was not built from the bytes of ``files`` as they are now, or None.

    Only the files whose (ctime, inode) differ from ``stamps.json`` are read and hashed; when
    all of them have the bytes ``meta.json`` hashes (a copy, a ``chmod``, a remount), their new
    stamps are recorded (atomically; a read-only cache folder, or one removed meanwhile, keeps
    the old ones: hashed again at the next open)."""
    hashes = meta.get("file_hashes")
    if meta.get("file_hash") != FILE_HASH or not isinstance(hashes, list):
        return "its meta.json holds no hashes of the slice files it was built from"
    if len(hashes) != len(files):
        return f"its meta.json hashes {len(hashes)} slice files, not {len(files)}"
    current = _stamps(files)
    try:
        stored = json.loads((folder / _STAMPS).read_text()).get("stamps")
    except (OSError, ValueError, AttributeError):
        stored = None
    if not isinstance(stored, list) or len(stored) != len(files):
        stored = [None] * len(files)
    moved = [i for i, (was, now) in enumerate(zip(stored, current, strict=True)) if was != now]
    if not moved:
        return None
    started = time.perf_counter()
    for i in moved:
        path = files[i][0]
        try:
            same = file_hash(path.read_bytes()) == hashes[i]
        except OSError:
            same = False
        if not same:
            return (
                f"'{path}' is not the file it was built from (same name, size and modification "
                "time, other bytes: replaced, or rewritten with its time set back)"
            )
    log.info(
        "Decoded-slice cache %s: %d of its %d slice files were copied, moved or changed in "
        "metadata only (ctime or inode); their bytes are the same (hashed in %.2f s)",
        folder,
        len(moved),
        len(files),
        time.perf_counter() - started,
    )
    try:
        with atomic_path(folder / _STAMPS, make_parents=False) as tmp:
            tmp.write_text(json.dumps({"stamps": current}), encoding="utf-8")
    except (OSError, WriteError) as exc:
        log.debug("Cannot record the new stamps in %s: %s", folder, exc)
    return None


def _load_cache(
    folder: Path, files: Sequence[FileStat]
) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """The memory-mapped arrays and meta of a finished cache folder built from the bytes of
    ``files`` as they are now (:func:`_changed_file`) whose checksums match
    (:func:`_changed_arrays`), held by this process (:func:`_hold`); or None (after one
    warning and removing the folder, when it exists but is unreadable or either check fails)."""
    if not (folder / "meta.json").exists():
        return None
    inode = None
    try:
        inode = os.stat(folder).st_ino
        fd = _hold(folder)
        if fd is None:
            return None  # removed meanwhile
        meta = _read_json_fd(fd)
        reason = _changed_file(folder, meta, files)
        if reason is None:
            images = np.load(folder / "images.npy", mmap_mode="r")
            masks = np.load(folder / "masks.npy", mmap_mode="r")
            reason = _changed_arrays(folder, meta, images, masks)
            if reason is None:
                return images, masks, meta
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
    (:func:`remove_stale_builds`), and after a build the caches of earlier states of this
    data root that no process uses (:func:`remove_older_caches`).
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
        remove_stale_builds(cache_dir)
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

    files = stat_files(records)
    folder = Path(cache_dir) / _key(files, root, "raise")
    cached = _load_cache(folder, files)
    if cached is not None:
        images, masks, _ = cached
        if images.shape == (*shape, 3) and masks.shape == shape:
            log.info("Using decoded-slice cache %s", folder)
            return DecodedSlices(images, masks, kept)
        _discard(folder)

    log.info("Decoding %d slices from %s into cache %s", len(records), root, folder)
    meta = {"format": CACHE_FORMAT, "root": str(root.resolve()), "num_slices": len(records)}

    def fill(images: np.ndarray, masks: np.ndarray) -> list[str | None]:
        return _decode_into(records, images, masks)

    images, masks = _build_cache(folder, shape, fill, meta, files, root)
    remove_older_caches(cache_dir, folder, root, "raise")
    return DecodedSlices(images, masks, kept)


def _decode_skipping(
    records: Sequence[SliceRecord], root: Path, cache_dir: Path | None
) -> DecodedSlices:
    folder = files = None
    if cache_dir is not None:
        files = stat_files(records)
        folder = cache_dir / _key(files, root, "skip")
        cached = _load_cache(folder, files)
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

    def fill(images: np.ndarray, masks: np.ndarray) -> list[str | None]:
        for row in range(len(arrays)):
            images[row], masks[row] = arrays[row]
            arrays[row] = None  # free as we go: one copy of the set in memory at a time
        return scan.hashes

    if folder is None or files is None:
        images = np.empty((*shape, 3), np.uint8)
        masks = np.empty(shape, np.uint8)
        fill(images, masks)
        return DecodedSlices(images, masks, scan.kept, scan.problems)
    log.info("Decoding %d slices from %s into cache %s", len(records), root, folder)
    meta = {
        "format": CACHE_FORMAT,
        "root": str(root.resolve()),
        "num_slices": len(scan.kept),
        "on_error": "skip",
        "kept": scan.kept,
        "skipped": scan.problems,
    }
    images, masks = _build_cache(folder, shape, fill, meta, files, root)
    remove_older_caches(cache_dir, folder, root, "skip")
    return DecodedSlices(images, masks, scan.kept, scan.problems)
