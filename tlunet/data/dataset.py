"""A map-style Dataset over decoded slices."""

from __future__ import annotations

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset


class SliceDataset(Dataset):
    """Rows ``rows`` of decoded arrays, transformed by ``transform``.

    Each item is a dict: ``image`` (3, S, S) float32, ``mask`` (1, S, S) float32 in {0, 1},
    ``patient`` int64 (the patient's position in the sorted patient list), ``slice`` int64
    (slice number in the file name), ``row`` int64 (row in the decoded arrays).
    """

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        rows: np.ndarray,
        patient_ids: np.ndarray,
        slice_numbers: np.ndarray,
        transform: A.Compose,
    ) -> None:
        self.images = images
        self.masks = masks
        self.rows = np.asarray(rows, dtype=np.int64)
        self.patient_ids = np.asarray(patient_ids, dtype=np.int64)
        self.slice_numbers = np.asarray(slice_numbers, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = int(self.rows[i])
        out = self.transform(image=np.asarray(self.images[row]), mask=np.asarray(self.masks[row]))
        return {
            "image": out["image"].float(),
            "mask": out["mask"].unsqueeze(0).float(),
            "patient": torch.tensor(self.patient_ids[row]),
            "slice": torch.tensor(self.slice_numbers[row]),
            "row": torch.tensor(row),
        }
