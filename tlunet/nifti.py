"""NIfTI volumes in and out of prediction: find, check, slice, scale, and write the mask back.

Torch-free (numpy + nibabel) so that any predictor can use it. One case is one patient: a
folder holding three co-registered 3-D volumes, pre-contrast T1, FLAIR and post-contrast T1
(the kaggle_3m channel order), found by glob patterns matched case-insensitively against the
file names, exactly one file each; or the FLAIR volume alone (``channels="flair_only"``,
FLAIR repeated into the three channels: outside the training distribution).

Geometry. Each volume is reoriented (nibabel's ``io_orientation``, i.e. the voxel axes
closest to the world axes of the affine, as ``nib.as_closest_canonical`` does) so that the
voxel array runs (P, L, S): slice ``k`` is an axial plane, inferior to superior, whose rows run
anterior to posterior and columns patient right to left: the radiological display of the
kaggle_3m slices (DICOM rows and columns). The mask is put back into the input's voxel order
before it is written with the FLAIR file's affine, so it overlays the input in any viewer.
No resampling: an oblique acquisition is sliced along its voxel axes closest to axial.

Intensities. The kaggle_3m slices are 8-bit exports rescaled per volume; the exact mapping is
not published. :func:`scale_to_uint8` approximates it: per volume, two percentiles (default
0.5 and 99.5 %) of the voxels above the volume's minimum (so the background of skull-stripped
or zero-filled volumes does not decide the scale) are mapped linearly to two grey levels
(default 0 and 145: where the 40-patient kaggle_3m sample holds them, median over patients and
channels) and clipped to 0..255. A robust percentile rather than the maximum, so one hot voxel
does not darken a scan. An approximation: check the overlays of a new scanner's data.
"""

from __future__ import annotations

import fnmatch
import gzip
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from tlunet.errors import ConfigError, DataError, one_line
from tlunet.utils import atomic_path

__all__ = [
    "AFFINE_TOLERANCE_MM",
    "CHANNEL_MODES",
    "LEVELS",
    "PERCENTILES",
    "NiftiCase",
    "ROLES",
    "SLICE_AXCODES",
    "axial_slices",
    "find_volumes",
    "from_axial_slices",
    "is_nifti",
    "load_volume",
    "read_case",
    "scale_to_uint8",
    "voxel_volume_ml",
    "write_mask",
]

#: The three volumes of a case, in the kaggle_3m channel order.
ROLES = ("pre", "flair", "post")
#: ``all``: the three volumes; ``flair_only``: FLAIR repeated into the three channels.
CHANNEL_MODES = ("all", "flair_only")
#: Voxel axes of a slice stack: rows anterior->posterior, columns right->left, slices up.
SLICE_AXCODES = ("P", "L", "S")
#: Largest difference (mm, any affine element) tolerated between the volumes of one case.
AFFINE_TOLERANCE_MM = 1e-3
#: Percentiles (%) of each volume's voxels above its minimum, and the grey levels they map to:
#: over the 40-patient kaggle_3m sample the median 0.5 and 99.5 % points of every channel lie
#: at grey 1 and 140..150 (the volume maximum near 255), so a scan is scaled to look alike.
PERCENTILES = (0.5, 99.5)
LEVELS = (0.0, 145.0)
_READ_ERRORS = (ImageFileError, OSError, EOFError, ValueError, TypeError, zlib.error)
_SPATIAL_UNIT_TO_MM = {"mm": 1.0, "meter": 1000.0, "micron": 1e-3, "unknown": 1.0}


def is_nifti(path: Path) -> bool:
    """True for a ``.nii`` or ``.nii.gz`` file name (any case)."""
    name = path.name.lower()
    return name.endswith((".nii", ".nii.gz"))


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if is_nifti(p) and p.is_file() and not p.name.startswith(".")
    )


def _check_channels(channels: str) -> None:
    if channels not in CHANNEL_MODES:
        raise ConfigError(f"nifti.channels={channels!r} is not one of {', '.join(CHANNEL_MODES)}.")


def find_volumes(folder: Path, patterns: Mapping[str, str], channels: str) -> dict[str, Path]:
    """The file of each role (``pre``, ``flair``, ``post``; ``flair`` alone for ``flair_only``)
    in ``folder``: the one NIfTI file whose name matches ``patterns[role]`` (case-insensitive).

    Raises :class:`DataError` naming the folder and the pattern when a pattern matches no file
    or several, or when one file matches two roles.
    """
    _check_channels(channels)
    roles = ROLES if channels == "all" else ("flair",)
    files = _nifti_files(folder)
    found: dict[str, Path] = {}
    for role in roles:
        pattern = str(patterns[role])
        matches = [p for p in files if fnmatch.fnmatchcase(p.name.lower(), pattern.lower())]
        if len(matches) != 1:
            listed = ", ".join(p.name for p in matches) if matches else "none"
            raise DataError(
                f"NIfTI folder '{folder}': {len(matches)} files match nifti.{role}='{pattern}' "
                f"({listed}); exactly one is needed: set nifti.{role}=<pattern>."
            )
        found[role] = matches[0]
    shared = [r for r in roles if list(found.values()).count(found[r]) > 1]
    if shared:
        raise DataError(
            f"NIfTI folder '{folder}': '{found[shared[0]].name}' matches the patterns of "
            f"{' and '.join(f'nifti.{r}' for r in shared)}; make the patterns distinct."
        )
    return found


def load_volume(path: Path) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """The image and its voxels as a 3-D float32 array (a 4-D file of one volume is squeezed).

    Raises :class:`DataError` naming the file when it cannot be read (missing, corrupt,
    truncated), is 2-D, holds more than one volume, or has an affine that is not finite (NaN,
    infinity) or singular, or voxel sizes that are not finite.
    """
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj, dtype=np.float32)
    except _READ_ERRORS as exc:
        raise DataError(f"Cannot read NIfTI file '{path}': {one_line(exc)}") from None
    if data.ndim < 3:
        raise DataError(
            f"NIfTI file '{path}' is {data.ndim}-D (shape {data.shape}); a 3-D volume is needed."
        )
    if data.ndim > 3:
        volumes = int(np.prod(data.shape[3:]))
        if volumes != 1:
            raise DataError(
                f"NIfTI file '{path}' holds {volumes} volumes (shape {data.shape}); give one "
                "3-D volume (e.g. extract it with nibabel or fslroi)."
            )
        data = data.reshape(data.shape[:3])
    if not np.isfinite(image.affine).all():
        raise DataError(
            f"NIfTI file '{path}' has an affine with non-finite values (NaN or infinity): "
            "where its voxels lie is unknown; fix its header (qform/sform)."
        )
    zooms = np.asarray(image.header.get_zooms()[:3], dtype=np.float64)
    if not np.isfinite(zooms).all():
        raise DataError(
            f"NIfTI file '{path}' has non-finite voxel sizes {zooms.tolist()} (pixdim): "
            "volumes in mL would be NaN; fix its header."
        )
    if abs(np.linalg.det(image.affine[:3, :3])) < 1e-12:
        raise DataError(f"NIfTI file '{path}' has a singular affine; fix its header.")
    return image, data


def _check_same_grid(images: Mapping[str, Any], arrays: Mapping[str, np.ndarray], paths) -> None:
    ref = "flair"
    for role, data in arrays.items():
        if role == ref:
            continue
        if data.shape != arrays[ref].shape:
            raise DataError(
                f"NIfTI volumes differ: '{paths[role]}' has shape {data.shape} but "
                f"'{paths[ref]}' has {arrays[ref].shape}; the volumes must be co-registered on "
                "one voxel grid (resample them first)."
            )
        diff = float(np.abs(images[role].affine - images[ref].affine).max())
        if diff > AFFINE_TOLERANCE_MM:
            raise DataError(
                f"NIfTI volumes differ: the affine of '{paths[role]}' differs from that of "
                f"'{paths[ref]}' by up to {diff:.4g} mm (tolerance {AFFINE_TOLERANCE_MM} mm); "
                "the volumes must be co-registered on one voxel grid (resample them first)."
            )


def scale_to_uint8(
    volume: np.ndarray,
    percentiles: Sequence[float] = PERCENTILES,
    levels: Sequence[float] = LEVELS,
    name: str = "volume",
) -> np.ndarray:
    """``volume`` scaled to uint8 like a kaggle_3m export (an approximation): the
    ``percentiles`` (in %) of the voxels above the volume's minimum map linearly to the grey
    ``levels``, the result is clipped to 0..255, non-finite voxels become 0. Same shape.

    Raises :class:`DataError` naming ``name`` for a constant (or all non-finite) volume.
    """
    low, high = (float(p) for p in percentiles)
    if not 0.0 <= low < high <= 100.0:
        raise ConfigError(
            f"nifti.percentiles={list(percentiles)} must be two percentages, low < high."
        )
    level_lo, level_hi = (float(v) for v in levels)
    if not 0.0 <= level_lo < level_hi <= 255.0:
        raise ConfigError(
            f"nifti.levels={list(levels)} must be two grey levels, 0 <= low < high <= 255."
        )
    finite = np.isfinite(volume)
    values = volume[finite]
    foreground = values[values > values.min()] if values.size else values
    if foreground.size == 0:
        raise DataError(f"NIfTI file '{name}' is constant (or not finite): nothing to segment.")
    lo, hi = np.percentile(foreground, [low, high])
    if hi <= lo:
        lo, hi = float(values.min()), float(foreground.max())
    scaled = level_lo + (np.where(finite, volume, lo) - lo) * ((level_hi - level_lo) / (hi - lo))
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def _ornt(affine: np.ndarray) -> np.ndarray:
    return ornt_transform(io_orientation(affine), axcodes2ornt(SLICE_AXCODES))


def axial_slices(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(n, H, W, ...) axial slices of a volume in voxel order ``affine`` (see the module's
    docstring for the orientation); extra trailing axes (channels) are kept."""
    reoriented = apply_orientation(volume, _ornt(affine))
    return np.moveaxis(reoriented, 2, 0)


def from_axial_slices(slices: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The inverse of :func:`axial_slices`: (n, H, W) slices back in the voxel order of
    ``affine``."""
    stacked = np.moveaxis(slices, 0, 2)
    back = ornt_transform(axcodes2ornt(SLICE_AXCODES), io_orientation(affine))
    return np.ascontiguousarray(apply_orientation(stacked, back))


def _slice_spacing(image: Any) -> tuple[float, float, float]:
    """The zooms of the (P, L, S) axes of :func:`axial_slices`."""
    zooms = image.header.get_zooms()[:3]
    out = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(_ornt(image.affine)):
        out[int(target)] = float(zooms[axis])
    return out[0], out[1], out[2]


def voxel_volume_ml(image: Any) -> tuple[float, str]:
    """The volume of one voxel in mL from the header's zooms and spatial unit, and a note
    (empty, or saying the unit was unknown and taken as mm)."""
    header = image.header
    unit = header.get_xyzt_units()[0] if hasattr(header, "get_xyzt_units") else "unknown"
    to_mm = _SPATIAL_UNIT_TO_MM.get(unit or "unknown", 1.0)
    note = "" if unit == "mm" else f"spatial unit '{unit}' taken as {to_mm:g} mm"
    zooms = np.asarray(header.get_zooms()[:3], dtype=np.float64) * to_mm
    return float(np.prod(zooms)) / 1000.0, note


def write_mask(path: Path, mask: np.ndarray, reference: Any) -> Path:
    """Write ``mask`` (uint8 0/1, the reference's 3-D voxel grid) atomically as NIfTI-1 with the
    reference image's affine (and its qform/sform codes and units where it has them)."""
    out = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), reference.affine)
    header = reference.header
    if isinstance(header, nib.Nifti1Header):
        out.set_qform(reference.affine, int(header["qform_code"]) or 1)
        out.set_sform(reference.affine, int(header["sform_code"]) or 1)
        out.header.set_xyzt_units(*header.get_xyzt_units())
    out.header.set_data_dtype(np.uint8)
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(out.to_bytes(), compresslevel=6))
    return path


@dataclass(frozen=True)
class NiftiCase:
    """One patient's volumes, checked and ready for a 2-D network.

    Attributes:
        folder: the case's folder.
        files: the file of each role used (``flair`` alone under ``flair_only``).
        reference: the FLAIR image (its affine, shape and zooms are the output's).
        shape: the 3-D voxel shape of every volume.
        slices: (n, H, W, 3) uint8 axial slices, channels (pre, FLAIR, post) as in kaggle_3m.
        spacing: (row, column, slice) spacing of ``slices`` in the header's unit (mm).
        warnings: what the caller should tell the user (FLAIR alone, non-square pixels).
    """

    folder: Path
    files: dict[str, Path]
    reference: Any
    shape: tuple[int, int, int]
    slices: np.ndarray
    spacing: tuple[float, float, float]
    warnings: tuple[str, ...] = ()

    def mask_volume(self, masks: np.ndarray) -> np.ndarray:
        """(n, H, W) slice masks as a uint8 0/1 volume on the input's voxel grid."""
        volume = from_axial_slices((np.asarray(masks) > 0).astype(np.uint8), self.reference.affine)
        assert volume.shape == self.shape, (volume.shape, self.shape)
        return volume

    def summary(self, volume: np.ndarray) -> dict[str, Any]:
        """Tumour voxels and volume (mL, from the FLAIR header's zooms) of a mask volume."""
        voxel_ml, note = voxel_volume_ml(self.reference)
        voxels = int(np.count_nonzero(volume))
        per_slice = np.count_nonzero(axial_slices(volume, self.reference.affine), axis=(1, 2))
        return {
            "shape": list(self.shape),
            "voxel_size": [float(z) for z in self.reference.header.get_zooms()[:3]],
            "voxel_volume_ml": voxel_ml,
            "tumour_voxels": voxels,
            "tumour_volume_ml": voxels * voxel_ml,
            "slices": len(per_slice),
            "slices_with_tumour": int(np.count_nonzero(per_slice)),
            **({"note": note} if note else {}),
        }


def read_case(
    source: Path,
    patterns: Mapping[str, str],
    channels: str = "all",
    percentiles: Sequence[float] = PERCENTILES,
    levels: Sequence[float] = LEVELS,
) -> NiftiCase:
    """Find, read, check and slice one case. ``source`` is the case's folder, or (under
    ``flair_only``) the FLAIR file itself. Every problem raises one :class:`DataError` naming
    the file (or the folder and the pattern) before any model is needed."""
    _check_channels(channels)
    if source.is_file():
        if channels != "flair_only":
            raise DataError(
                f"input '{source}' is one NIfTI file: give the folder holding the pre-contrast, "
                "FLAIR and post-contrast volumes, or nifti.channels=flair_only for FLAIR alone."
            )
        files, folder = {"flair": source}, source.parent
    else:
        files, folder = find_volumes(source, patterns, channels), source
    loaded = {role: load_volume(path) for role, path in files.items()}
    images = {role: image for role, (image, _) in loaded.items()}
    arrays = {role: data for role, (_, data) in loaded.items()}
    _check_same_grid(images, arrays, files)
    reference = images["flair"]
    warnings = []
    if channels == "flair_only":
        warnings.append(
            "nifti.channels=flair_only: FLAIR is repeated into the pre- and post-contrast "
            "channels; the model never saw such input (outside its training distribution), "
            "so treat the masks with caution."
        )
    spacing = _slice_spacing(reference)
    if max(spacing[:2]) > 1.5 * min(spacing[:2]):
        warnings.append(
            f"'{files['flair']}': axial pixels of {spacing[0]:.3g} x {spacing[1]:.3g} mm are far "
            "from square; each slice is resized to the network's square input without "
            "resampling, so anatomy is distorted (resample to square pixels first)."
        )
    scaled = {
        role: scale_to_uint8(arrays[role], percentiles, levels, name=str(files[role]))
        for role in files
    }
    channels_in_order = [scaled[r] if r in scaled else scaled["flair"] for r in ROLES]
    slices = axial_slices(np.stack(channels_in_order, axis=-1), reference.affine)
    return NiftiCase(
        folder=folder,
        files=dict(files),
        reference=reference,
        shape=tuple(int(s) for s in arrays["flair"].shape),
        slices=np.ascontiguousarray(slices),
        spacing=spacing,
        warnings=tuple(warnings),
    )
