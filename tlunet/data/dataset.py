"""A map-style Dataset over decoded slices, and the seeded sampler that makes training
reproducible: data order and every augmentation are functions of (seed, epoch, slice)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def epoch_seeds(seed: int, epoch: int, num_samples: int) -> tuple[int, np.ndarray]:
    """The seed of the order of ``epoch`` and the augmentation seed of every sample in it,
    for a run seeded ``seed`` (one SeedSequence per epoch: cheap)."""
    order = int(np.random.SeedSequence([seed, epoch, 0]).generate_state(1)[0])
    return order, np.random.SeedSequence([seed, epoch, 1]).generate_state(num_samples)


class SeededShuffleSampler(Sampler[tuple[int, int]]):
    """Shuffles ``num_samples`` indices with a permutation drawn from ``(seed, epoch)`` and
    pairs each index with its augmentation seed.

    Lightning calls :meth:`set_epoch` before every epoch (also after resuming from a
    checkpoint), so epoch ``e`` of a run sees the same order and the same augmentations
    whether or not the run was interrupted, whatever the number of DataLoader workers.
    Without ``set_epoch`` calls the epoch advances by one per pass.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order_seed, seeds = epoch_seeds(self.seed, self.epoch, self.num_samples)
        self.epoch += 1
        order = torch.randperm(
            self.num_samples, generator=torch.Generator().manual_seed(order_seed)
        )
        return iter([(i, int(seeds[i])) for i in order.tolist()])


class SliceDataset(Dataset):
    """Rows ``rows`` of decoded arrays, transformed by ``transform``.

    Each item is a dict: ``image`` (3, S, S) float32, ``mask`` (1, S, S) float32 in {0, 1},
    ``patient`` int64 (the patient's position in the sorted patient list), ``slice`` int64
    (slice number in the file name), ``row`` int64 (row in the decoded arrays); with
    ``native_masks`` also ``mask_native`` (1, H, W) uint8 in {0, 1}, the mask as stored on
    disk, untransformed (for scoring at native resolution; evaluation stages only).
    """

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        rows: np.ndarray,
        patient_ids: np.ndarray,
        slice_numbers: np.ndarray,
        transform: A.Compose,
        native_masks: bool = False,
    ) -> None:
        self.images = images
        self.masks = masks
        self.rows = np.asarray(rows, dtype=np.int64)
        self.patient_ids = np.asarray(patient_ids, dtype=np.int64)
        self.slice_numbers = np.asarray(slice_numbers, dtype=np.int64)
        self.transform = transform
        self.native_masks = native_masks

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """Sample ``item``: an index, or ``(index, seed)`` from :class:`SeededShuffleSampler`
        (the augmentations then draw from generators seeded with ``seed``)."""
        if isinstance(item, tuple | list):
            i, seed = (int(v) for v in item)
            self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        else:
            i = int(item)
        row = int(self.rows[i])
        mask = np.array(self.masks[row])  # a writable copy: ToTensorV2 may hand it to torch
        out = self.transform(image=np.asarray(self.images[row]), mask=mask)
        item = {
            "image": out["image"].float(),
            "mask": out["mask"].unsqueeze(0).float(),
            "patient": torch.tensor(self.patient_ids[row]),
            "slice": torch.tensor(self.slice_numbers[row]),
            "row": torch.tensor(row),
        }
        if self.native_masks:
            item["mask_native"] = torch.from_numpy(np.array(mask, dtype=np.uint8))[None]
        return item
