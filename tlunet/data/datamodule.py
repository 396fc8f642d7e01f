"""The LightningDataModule: index -> split -> decoded cache -> transforms -> DataLoaders."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader

from tlunet.data.cache import ON_ERRORS, DecodedSlices, decode_slices
from tlunet.data.dataset import SeededShuffleSampler, SliceDataset
from tlunet.data.fingerprint import patient_fingerprint, patient_rows
from tlunet.data.index import SliceRecord, scan_kaggle3m, stray_entries
from tlunet.data.splits import (
    PAPER_SPLIT_SIZES,
    STAGES,
    kfold_patient_split,
    split_by_patient,
    split_by_slice,
)
from tlunet.data.synthetic import holds_phantoms, write_synthetic_dataset
from tlunet.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform, channel_stats
from tlunet.errors import ConfigError, DataError
from tlunet.lightning_compat import epochs_processed
from tlunet.utils import check_folder

log = logging.getLogger(__name__)

SPLITS = ("patient", "paper")
NORMALIZATIONS = ("encoder", "imagenet", "dataset")


def patient_positions(records: Sequence[SliceRecord]) -> tuple[list[str], np.ndarray]:
    """The sorted patient names of ``records`` and each record's position in that list."""
    patients = sorted({r.patient for r in records})
    position = {name: i for i, name in enumerate(patients)}
    return patients, np.array([position[r.patient] for r in records])


class LGGDataModule(pl.LightningDataModule):
    """kaggle_3m slices for training, validation and test.

    Args:
        root: folder holding one sub-folder per patient (``kaggle_3m/``).
        split: ``patient`` (whole patients per stage, seeded) or ``paper`` (slice-level
            3005/393/531 proportions, as in the TL-U-Net paper).
        split_fractions: train/val/test fractions of patients for ``split=patient``.
        split_seed: seed of the split shuffle (independent of the training seed).
        num_folds, fold: patient-level k-fold cross-validation (``split=patient`` only): the
            test patients are fold ``fold`` of ``num_folds``, validation patients are carved
            from the others in the proportion of ``split_fractions``. ``None``: no folds.
        image_size: side in pixels the slices are resized to (a multiple of 32).
        batch_size, num_workers, pin_memory, persistent_workers: DataLoader settings;
            ``pin_memory=None`` pins batches only when training on a CUDA GPU.
        normalization: ``encoder`` (the statistics the weights of ``encoder_name`` were
            trained with: :func:`tlunet.models.preprocessing.encoder_preprocessing`; ImageNet's
            for encoders without pretrained weights), ``imagenet`` (ImageNet mean/std) or
            ``dataset`` (per-channel mean/std of the training split).
        encoder_name, encoder_weights: the model's encoder (``encoder.name``) and weights tag
            (``encoder.weights``), for ``normalization=encoder``.
        preprocessing: a trained model's ``{"image_size", "mean", "std"}`` (from its
            checkpoint): when given they replace ``image_size`` and ``normalization``, so a
            model is evaluated on exactly the input it was trained on, whatever the data.
        augment: albumentations transforms applied to training slices after resizing.
        cache_dir: folder for the decoded-slice cache (``None``: decode into memory each run).
        seed: seed of the training order and augmentations (:class:`SeededShuffleSampler`).
        on_error: ``raise`` (stop at the first unusable file, naming it) or ``skip`` (drop each
            unusable slice, listed in ``skipped`` after :meth:`setup`).
        synthetic: parameters of :func:`write_synthetic_dataset`; when given, the phantoms
            are written to ``root`` first (``data=synthetic``) when ``root`` lies in
            ``synthetic_cache``. A ``root`` elsewhere is only read, and only when it holds the
            complete phantom set of these parameters and nothing else; any other ``root`` is
            refused (:class:`ConfigError`): phantoms never go into the user's folders.
        synthetic_cache: the folder of tlunet's cache that ``data=synthetic`` keeps its
            phantoms in (``${paths.cache_dir}/synthetic``); ``None``: nowhere may be written.
    """

    def __init__(
        self,
        root: str | None,
        split: str = "patient",
        split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
        split_seed: int = 42,
        paper_split_sizes: Sequence[int] = PAPER_SPLIT_SIZES,
        num_folds: int | None = None,
        fold: int = 0,
        image_size: int = 256,
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        normalization: str = "encoder",
        augment: Sequence[A.BasicTransform] | None = None,
        cache_dir: str | None = None,
        synthetic: Mapping[str, Any] | None = None,
        synthetic_cache: str | None = None,
        on_error: str = "raise",
        seed: int = 0,
        encoder_name: str | None = None,
        encoder_weights: str | None = None,
        preprocessing: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if on_error not in ON_ERRORS:
            raise ConfigError(
                f"data.on_error='{on_error}' is unknown; choose one of {list(ON_ERRORS)}."
            )
        if split not in SPLITS:
            raise ConfigError(f"data.split='{split}' is unknown; choose one of {list(SPLITS)}.")
        if normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"data.normalization='{normalization}' is unknown; choose one of "
                f"{list(NORMALIZATIONS)}."
            )
        if image_size <= 0 or image_size % 32:
            raise ConfigError(
                f"data.image_size={image_size} must be a positive multiple of 32 "
                "(the U-Net downsamples five times)."
            )
        if batch_size <= 0:
            raise ConfigError(f"data.batch_size={batch_size} must be positive.")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers} must be 0 or more.")
        self.root = root
        self.split = split
        self.split_fractions = tuple(split_fractions)
        self.split_seed = split_seed
        self.paper_split_sizes = tuple(paper_split_sizes)
        if num_folds is not None and split != "patient":
            raise ConfigError(
                f"data.num_folds={num_folds} needs data.split=patient (got '{split}'): "
                "cross-validation folds are sets of whole patients."
            )
        self.num_folds = num_folds
        self.fold = fold
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.normalization = normalization
        self.augment = list(augment or [])
        self.cache_dir = cache_dir
        self.synthetic = dict(synthetic) if synthetic else None
        self.synthetic_cache = synthetic_cache
        self.on_error = on_error
        self.seed = seed

        self.records: list[SliceRecord] = []
        #: ``{"path", "reason"}`` of every slice dropped with ``on_error=skip``, sorted by path.
        self.skipped: list[dict[str, str]] = []
        self.patients: list[str] = []
        self.decoded: DecodedSlices | None = None
        self._fingerprints: dict[str, str] = {}  # patient -> fingerprint, filled on demand
        self.stage_rows: dict[str, np.ndarray] = {}
        self.datasets: dict[str, SliceDataset] = {}
        self.mean: list[float] = list(IMAGENET_MEAN)
        self.std: list[float] = list(IMAGENET_STD)
        self.normalization_source = "ImageNet statistics"
        self.fixed_preprocessing = dict(preprocessing) if preprocessing else None
        if self.fixed_preprocessing is not None:
            try:
                self.image_size = int(self.fixed_preprocessing["image_size"])
                self.mean = [float(v) for v in self.fixed_preprocessing["mean"]]
                self.std = [float(v) for v in self.fixed_preprocessing["std"]]
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(
                    f"The stored preprocessing {self.fixed_preprocessing} lacks image_size, "
                    f"mean or std: {exc}"
                ) from exc
            self.normalization = self.fixed_preprocessing.get("normalization", normalization)
            self.normalization_source = "the checkpoint's stored preprocessing"
        elif normalization == "encoder":
            from tlunet.models.preprocessing import encoder_preprocessing

            stats = encoder_preprocessing(encoder_name, encoder_weights)
            self.mean, self.std = stats["mean"], stats["std"]
            self.normalization_source = stats["source"]

    # -- Lightning hooks ---------------------------------------------------------------
    def prepare_data(self) -> None:
        """``data=synthetic``: write the phantoms into ``root`` when it lies in tlunet's cache
        (``synthetic_cache``), read a complete phantom set elsewhere as it is, refuse any other
        ``root`` naming it (see the class's ``synthetic``). Nothing to do for real data."""
        if self.synthetic is None:
            return
        if not self.root:
            raise ConfigError("data.root must name a folder to write the synthetic set to.")
        root = Path(str(self.root)).expanduser()
        cache = self.synthetic_cache
        if cache is not None and root.resolve().is_relative_to(
            Path(str(cache)).expanduser().resolve()
        ):
            check_folder(
                root,
                "data.root",
                "Remove it, or set TLUNET_CACHE_DIR (tlunet's cache) to a folder.",
            )
            try:
                write_synthetic_dataset(root, **self.synthetic)
            except (TypeError, ValueError) as exc:  # impossible or unknown phantom settings
                raise ConfigError(f"data.synthetic: {exc}") from exc
        elif holds_phantoms(root, **self.synthetic):
            log.info("data=synthetic: reading the phantoms in %s as they are", root)
        else:
            where = f"tlunet's cache ('{cache}')" if cache is not None else "tlunet's cache"
            raise ConfigError(
                f"data=synthetic writes its phantoms only into {where}, and data.root '{root}' "
                "lies outside it without holding exactly the phantoms of data.synthetic: "
                f"nothing was written there. To train on the slices in '{root}', add "
                "data.synthetic=null (or use data=lgg); for phantoms, leave data.root unset."
            )

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        records, problems = scan_kaggle3m(self.root, strict=self.on_error == "raise")
        root = Path(str(self.root)).expanduser()
        for stray in stray_entries(root):
            log.warning("%s", stray["reason"])
        if not records:
            raise DataError(
                f"None of the slices under '{root}' can be used (data.on_error=skip skipped "
                f"them all); the first: {problems[0]['reason']}"
            )
        self.decoded = decode_slices(records, root, self.cache_dir, on_error=self.on_error)
        self.records = [records[i] for i in self.decoded.kept]  # decoded row i = self.records[i]
        self.skipped = sorted(problems + self.decoded.skipped, key=lambda p: p["path"])
        if self.skipped:
            log.warning(
                "data.on_error=skip: %d slices skipped under %s, the first: %s",
                len(self.skipped),
                root,
                self.skipped[0]["reason"],
            )
        self.patients, patient_ids = patient_positions(self.records)
        self.stage_rows = self.split_rows(self.records)
        slice_numbers = np.array([r.slice for r in self.records])
        if self.normalization == "dataset" and self.fixed_preprocessing is None:
            self.mean, self.std = channel_stats(self.decoded.images, self.stage_rows["train"])
            self.normalization_source = "per-channel statistics of the training split"
        for name in STAGES:
            transform = build_transform(
                self.image_size, self.mean, self.std, self.augment if name == "train" else ()
            )
            self.datasets[name] = SliceDataset(
                self.decoded.images,
                self.decoded.masks,
                self.stage_rows[name],
                patient_ids,
                slice_numbers,
                transform,
                native_masks=name != "train",  # scored at the masks' own resolution
            )
        has_tumour = self.decoded.has_tumour
        log.info(
            "Data %s: %d patients, %d slices (%d with tumour); split=%s -> %s",
            root,
            len(self.patients),
            len(self.records),
            int(has_tumour.sum()),
            self.split,
            ", ".join(f"{k} {len(v)} slices" for k, v in self.stage_rows.items()),
        )

    def split_rows(self, records: Sequence[SliceRecord]) -> dict[str, np.ndarray]:
        """Sorted row indices of ``records`` per stage under the configured split.

        Raises :class:`DataError` when the train or validation stage would be empty.
        """
        patients, patient_ids = patient_positions(records)
        if self.split == "paper":
            rows = split_by_slice(len(records), self.paper_split_sizes, self.split_seed)
        else:
            if self.num_folds is not None:
                parts = kfold_patient_split(
                    patients, self.num_folds, self.fold, self.split_fractions, self.split_seed
                )
            else:
                parts = split_by_patient(patients, self.split_fractions, self.split_seed)
            position = {name: i for i, name in enumerate(patients)}
            rows = {
                stage: np.flatnonzero(np.isin(patient_ids, [position[p] for p in names]))
                for stage, names in parts.items()
            }
        for name in ("train", "val"):
            if len(rows[name]) == 0:
                raise DataError(self.empty_stage_message(name))
        return rows

    def empty_stage_message(self, stage: str) -> str:
        """The one message for a stage of the split with no slice (train, val, test...)."""
        advice = "add data or change data.split_fractions"
        if stage == "test":
            advice += " (or train with test=false)"
        return f"The {self.split} split of '{self.root}' leaves the {stage} stage empty; {advice}."

    def add_stage_of_every_slice(self, name: str = "all") -> None:
        """A stage ``name`` holding every slice of the data, read as the test stage reads them
        (no augmentation, native-resolution masks): ``tlunet.evaluate stage=all``."""
        everything = copy.copy(self.datasets["test"])
        everything.rows = np.arange(len(self.records), dtype=np.int64)
        self.datasets[name] = everything

    def require_stage(self, stage: str) -> None:
        """Raise :class:`DataError` when ``stage`` (of the set-up datasets) holds no slice."""
        if len(self.datasets[stage]) == 0:
            raise DataError(self.empty_stage_message(stage))

    @property
    def preprocessing(self) -> dict[str, Any]:
        """What a model trained on this data expects of its input (saved in checkpoints)."""
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "normalization": self.normalization,
            "normalization_source": self.normalization_source,
        }

    @property
    def native_size(self) -> tuple[int, int] | None:
        """(H, W) of the masks on disk, at which validation and test are scored (after setup)."""
        if self.decoded is None:
            return None
        return tuple(int(v) for v in self.decoded.masks.shape[1:3])

    def stage_patients(self, stage: str) -> list[str]:
        """Sorted names of the patients with at least one slice in ``stage``."""
        return sorted({self.records[i].patient for i in self.stage_rows[stage]})

    def patient_fingerprints(self, names: Sequence[str]) -> dict[str, str]:
        """Patient name -> content fingerprint (:mod:`tlunet.data.fingerprint`: its image
        slices in slice order) for each of ``names`` (after :meth:`setup`). Each patient is
        hashed once per DataModule: every later call (each checkpoint save) reuses it."""
        missing = [name for name in names if name not in self._fingerprints]
        if missing:
            rows = patient_rows(self.records)
            for name in missing:
                self._fingerprints[name] = patient_fingerprint(self.decoded.images, rows[name])
        return {name: self._fingerprints[name] for name in names}

    def dataloader(self, stage: str, shuffle: bool = False) -> DataLoader:
        """The DataLoader over ``stage`` (train, val or test)."""
        dataset = self.datasets[stage]
        sampler = None
        if shuffle:
            sampler = SeededShuffleSampler(len(dataset), self.seed)
            # Lightning creates the first iterator (whose workers fetch from the sampler at once)
            # before it calls set_epoch(epochs processed): start at that epoch, which a resumed
            # run has restored by now.
            trainer = getattr(self, "trainer", None)
            if trainer is not None:
                sampler.set_epoch(epochs_processed(trainer))
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # Worker seeds come from this generator, not from the global random stream, which
            # stays the model's alone (dropout): a resumed run draws what the original would.
            generator=torch.Generator().manual_seed(self.seed),
            drop_last=shuffle and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self._pin_memory(),
            persistent_workers=self.persistent_workers,
        )

    def _pin_memory(self) -> bool:
        """``pin_memory``, or when ``None``: on when the attached trainer runs on a CUDA GPU
        (page-locked batches copy to the GPU asynchronously); off on the CPU, where it only
        costs."""
        if self.pin_memory is not None:
            return bool(self.pin_memory)
        accelerator = getattr(getattr(self, "trainer", None), "accelerator", None)
        return isinstance(accelerator, CUDAAccelerator)

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.require_stage("test")
        return self.dataloader("test", shuffle=False)
