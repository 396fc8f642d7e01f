"""tlunet.nifti: finding, checking, slicing and scaling NIfTI volumes; writing the mask back."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.nifti_phantoms import oblique_affine, to_voxels, write_phantom_case, write_volume
from tlunet.errors import ConfigError, DataError
from tlunet.nifti import (
    axial_slices,
    find_volumes,
    from_axial_slices,
    load_volume,
    read_case,
    scale_to_uint8,
    voxel_volume_ml,
    write_mask,
)

PATTERNS = {"pre": "*pre*.nii*", "flair": "*flair*.nii*", "post": "*post*.nii*"}


def test_axial_slices_follow_the_kaggle_display_on_an_oblique_grid() -> None:
    slices = np.arange(5 * 6 * 7).reshape(5, 6, 7)  # (n, H, W) as displayed
    affine = oblique_affine()
    assert np.array_equal(axial_slices(to_voxels(slices), affine), slices)
    # RAS voxels (identity affine): rows run anterior->posterior, columns right->left.
    ras = np.arange(4 * 3 * 2).reshape(4, 3, 2)
    expected = np.stack([ras[::-1, ::-1, z].T for z in range(2)])
    assert np.array_equal(axial_slices(ras, np.eye(4)), expected)


@pytest.mark.parametrize("seed", range(6))
def test_from_axial_slices_undoes_any_orientation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(rng.choice([-1, 1], 3) * rng.uniform(0.5, 4, 3))[rng.permutation(3)]
    affine[:3, 3] = rng.uniform(-100, 100, 3)
    volume = rng.integers(0, 9, size=(5, 6, 7))
    slices = axial_slices(volume, affine)
    assert np.array_equal(from_axial_slices(slices, affine), volume)


def test_scale_to_uint8_clips_percentiles_of_the_foreground() -> None:
    volume = np.zeros((10, 10, 10), np.float32)  # background (the minimum) is left out
    volume[2:8, 2:8, 2:8] = np.linspace(100, 1100, 216).reshape(6, 6, 6)
    volume[0, 0, 0] = np.nan
    out = scale_to_uint8(volume, (0.5, 99.5), (0, 255))
    assert out.dtype == np.uint8 and out.shape == volume.shape
    assert out[0, 0, 0] == 0 and out[9, 9, 9] == 0  # non-finite and background
    inside = out[2:8, 2:8, 2:8]
    assert inside.min() == 0 and inside.max() == 255
    assert 120 <= int(np.median(inside)) <= 135  # linear in between
    # Default: the 99.5 % point lands at grey 145 (kaggle_3m's), brighter voxels above it.
    default = scale_to_uint8(volume)[2:8, 2:8, 2:8]
    assert int(np.percentile(default, 99.5)) in (144, 145, 146) and default.max() <= 147
    # A scanner's linear intensity scale (gain, offset) does not change the result.
    assert np.array_equal(scale_to_uint8(volume * 3.5 - 40.0), scale_to_uint8(volume))
    with pytest.raises(DataError, match="'t1.nii' is constant"):
        scale_to_uint8(np.full((4, 4, 4), 7.0), name="t1.nii")
    with pytest.raises(ConfigError, match="percentiles"):
        scale_to_uint8(volume, (99.0, 1.0))
    with pytest.raises(ConfigError, match="levels"):
        scale_to_uint8(volume, levels=(0, 300))


def test_find_volumes_needs_exactly_one_match_per_role(tmp_path: Path) -> None:
    for name in ("T1_PRE.nii.gz", "flair.nii", "t1_post.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    found = find_volumes(tmp_path, PATTERNS, "all")  # case-insensitive
    assert {r: p.name for r, p in found.items()} == {
        "pre": "T1_PRE.nii.gz",
        "flair": "flair.nii",
        "post": "t1_post.nii.gz",
    }
    assert find_volumes(tmp_path, PATTERNS, "flair_only") == {"flair": tmp_path / "flair.nii"}
    (tmp_path / "flair_2.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"2 files match nifti.flair='\*flair\*.nii\*'") as info:
        find_volumes(tmp_path, PATTERNS, "all")
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"0 files match nifti.pre='\*t2\*'"):
        find_volumes(tmp_path, {**PATTERNS, "pre": "*t2*"}, "all")
    with pytest.raises(DataError, match="matches the patterns of nifti.pre and nifti.post"):
        find_volumes(tmp_path, {**PATTERNS, "pre": "t1_po*", "flair": "flair.nii"}, "all")
    with pytest.raises(ConfigError, match="nifti.channels='t1'"):
        find_volumes(tmp_path, PATTERNS, "t1")


def test_load_volume_refuses_2d_4d_and_corrupt_files(tmp_path: Path) -> None:
    affine = oblique_affine()
    with pytest.raises(DataError, match=r"'.*flat.nii.gz' is 2-D"):
        load_volume(write_volume(tmp_path / "flat.nii.gz", np.ones((8, 8), np.int16), affine))
    series = write_volume(tmp_path / "series.nii.gz", np.ones((8, 8, 4, 3), np.int16), affine)
    with pytest.raises(DataError, match=r"'.*series.nii.gz' holds 3 volumes"):
        load_volume(series)
    one = write_volume(tmp_path / "one.nii.gz", np.ones((8, 8, 4, 1), np.int16), affine)
    assert load_volume(one)[1].shape == (8, 8, 4)
    good = write_volume(tmp_path / "good.nii.gz", np.ones((8, 8, 4), np.int16), affine)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[:-40])
    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(b"not a nifti file at all" * 30)
    not_gzip = tmp_path / "plain.nii.gz"
    not_gzip.write_bytes(gzip.decompress(good.read_bytes())[:100])
    for bad in (truncated, garbage, not_gzip, tmp_path / "missing.nii"):
        with pytest.raises(DataError, match=f"Cannot read NIfTI file '{bad}'") as info:
            load_volume(bad)
        assert "\n" not in str(info.value)


def test_load_volume_refuses_a_non_finite_affine_or_voxel_size(tmp_path: Path) -> None:
    """Issue 21, item 13: a NaN in the affine passed every check (NaN compares false), and the
    mask was written with it."""
    voxels = np.ones((8, 8, 4), np.int16)
    for value in (np.nan, np.inf):
        affine = oblique_affine()
        affine[0, 3] = value
        path = write_volume(tmp_path / "nan.nii.gz", voxels, affine)
        with pytest.raises(DataError) as info:
            load_volume(path)
        assert str(info.value).startswith(f"NIfTI file '{path}' has an affine with non-finite")
        assert "\n" not in str(info.value)
    image = nib.Nifti1Image(voxels, oblique_affine())
    image.header["pixdim"][1] = np.nan  # the sform is fine, the voxel size is not
    nib.save(image, tmp_path / "zooms.nii.gz")
    with pytest.raises(DataError, match=r"'.*zooms\.nii\.gz' has non-finite voxel sizes \[nan"):
        load_volume(tmp_path / "zooms.nii.gz")


def test_read_case_checks_the_grid_and_slices_every_channel(tmp_path: Path) -> None:
    truth = write_phantom_case(tmp_path / "case", n_slices=6, size=32)
    case = read_case(tmp_path / "case", PATTERNS)
    assert case.slices.shape == (6, 32, 32, 3) and case.slices.dtype == np.uint8
    assert case.shape == truth.shape and case.warnings == ()
    assert np.allclose(case.spacing, (0.9, 0.9, 3.0))
    # FLAIR is the brightest channel in the lesion (tlunet.data.synthetic), pre the darkest.
    lesion = axial_slices(truth, case.reference.affine) > 0
    assert case.slices[..., 1][lesion].mean() > case.slices[..., 0][lesion].mean() + 40
    flair_only = read_case(tmp_path / "case" / "FLAIR.nii.gz", PATTERNS, "flair_only")
    assert np.array_equal(flair_only.slices[..., 0], case.slices[..., 1])
    assert np.array_equal(flair_only.slices[..., 2], case.slices[..., 1])
    assert "outside its training distribution" in flair_only.warnings[0]
    with pytest.raises(DataError, match="is one NIfTI file"):
        read_case(tmp_path / "case" / "FLAIR.nii.gz", PATTERNS, "all")

    post = tmp_path / "case" / "t1_post_gd.nii.gz"
    image = nib.load(post)
    data = np.asarray(image.dataobj)
    nudged = image.affine.copy()
    nudged[0, 3] += 1e-4  # float noise below the tolerance
    write_volume(post, data, nudged)
    read_case(tmp_path / "case", PATTERNS)
    nudged[0, 3] += 0.5
    write_volume(post, data, nudged)
    with pytest.raises(DataError, match=f"the affine of '{post}' differs .* by up to 0.500"):
        read_case(tmp_path / "case", PATTERNS)
    write_volume(post, data[:, :, :-1], image.affine)
    with pytest.raises(DataError, match=f"'{post}' has shape \\(6, 32, 31\\)"):
        read_case(tmp_path / "case", PATTERNS)


def test_write_mask_keeps_the_reference_grid_and_gives_millilitres(tmp_path: Path) -> None:
    affine = oblique_affine()
    reference = nib.load(write_volume(tmp_path / "flair.nii", np.ones((5, 6, 7), np.int16), affine))
    mask = np.zeros((5, 6, 7), np.uint8)
    mask[1:3, 2:4, 3:6] = 1
    written = nib.load(write_mask(tmp_path / "mask.nii.gz", mask, reference))
    assert np.allclose(written.affine, affine) and written.shape == mask.shape
    assert written.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(written.dataobj), mask)
    assert not list(tmp_path.glob(".*tmp"))  # atomic: no temporary left behind
    ml, note = voxel_volume_ml(reference)
    assert ml == pytest.approx(3.0 * 0.9 * 0.9 / 1000) and note == ""
    reference.header.set_xyzt_units("meter")
    assert voxel_volume_ml(reference)[0] == pytest.approx(3.0 * 0.9 * 0.9 * 1e6)


def test_the_module_imports_no_torch() -> None:
    code = "import sys, tlunet.nifti; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
