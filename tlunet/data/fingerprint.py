"""Content fingerprints of patients: how ``tlunet.evaluate`` recognises a patient the model
trained or validated on when it comes back under another folder name.

A patient's fingerprint is the xxh3-128 hash of its decoded image slices (uint8, (H, W, 3),
at the resolution on disk) in slice order, after a header with the slice count and size. It
covers the images, not the masks: tumour-free patients all have empty masks of one shape, so a
mask hash would make them all equal. A renamed copy (same slices under another folder and file
prefix) has the same fingerprint; a patient with any slice changed (one pixel, one slice more
or less, another resolution) has another one, so it is not recognised: the fingerprint tells
copies apart from new data, not similar patients from each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

from tlunet.data.index import SliceRecord

#: What a fingerprint hashes (stored beside the fingerprints in checkpoints).
FINGERPRINT = "xxh3_128 of the patient's uint8 image slices (H, W, 3) in slice order"


def patient_fingerprint(images: np.ndarray, rows: Sequence[int]) -> str:
    """Hex digest of the image slices ``images[rows]`` (rows in slice order), e.g. of a
    memory-mapped (N, H, W, 3) array: each slice is hashed in place, never copied."""
    h = xxhash.xxh3_128()
    h.update(f"tlunet-patient-v1|{len(rows)}|{tuple(images.shape[1:])}\n".encode())
    for row in rows:
        h.update(np.ascontiguousarray(images[int(row)]).data)
    return h.hexdigest()


def patient_rows(records: Sequence[SliceRecord]) -> dict[str, list[int]]:
    """Patient name -> the rows of ``records`` holding its slices, in slice order."""
    rows: dict[str, list[int]] = {}
    for i in sorted(range(len(records)), key=lambda i: records[i].slice):
        rows.setdefault(records[i].patient, []).append(i)
    return rows
