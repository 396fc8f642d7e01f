"""NIfTI phantom cases for the tests: tlunet.data.synthetic patients on an oblique voxel grid.

The voxel grid is built by hand (not with tlunet.nifti): voxel axis i runs superior (3 mm),
j to the patient's left and k anterior (0.9 mm each), the whole turned 12 degrees about the
superior axis and shifted. So the slice ``s`` of a phantom, displayed as kaggle_3m does (rows
anterior to posterior, columns right to left), is ``voxels[s, :, ::-1].T``.
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np

from tlunet.data.synthetic import make_phantom_volume

ZOOMS = (3.0, 0.9, 0.9)


def oblique_affine(degrees: float = 12.0) -> np.ndarray:
    """Voxel (i, j, k) -> world RAS mm: i superior, j left, k anterior; rotated and shifted."""
    columns = np.array([[0.0, -ZOOMS[1], 0.0], [0.0, 0.0, ZOOMS[2]], [ZOOMS[0], 0.0, 0.0]])
    t = math.radians(degrees)
    turn = np.array([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = turn @ columns
    affine[:3, 3] = (-31.5, 12.25, -40.0)
    return affine


def to_voxels(slices: np.ndarray) -> np.ndarray:
    """(n, H, W) displayed slices -> the (n, W, H) voxel array of :func:`oblique_affine`."""
    return np.ascontiguousarray(np.transpose(slices[:, ::-1, :], (0, 2, 1)))


def write_volume(path: Path, voxels: np.ndarray, affine: np.ndarray) -> Path:
    image = nib.Nifti1Image(voxels, affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)
    return path


def write_phantom_case(
    folder: Path,
    seed: int = 0,
    n_slices: int = 12,
    size: int = 64,
    names: tuple[str, str, str] = ("t1_pre.nii.gz", "FLAIR.nii.gz", "t1_post_gd.nii.gz"),
) -> np.ndarray:
    """Write a phantom patient's pre, FLAIR and post volumes (int16, arbitrary intensity
    scale) into ``folder``; return its true tumour mask (uint8 0/1) on the voxel grid."""
    folder.mkdir(parents=True, exist_ok=True)
    phantom = make_phantom_volume(np.random.default_rng(seed), n_slices, size, has_lesion=True)
    affine = oblique_affine()
    for channel, name in enumerate(names):
        voxels = to_voxels(phantom.images[..., channel]).astype(np.int16) * 7 + 3
        write_volume(folder / name, voxels, affine)
    return to_voxels((phantom.masks > 0).astype(np.uint8))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))
