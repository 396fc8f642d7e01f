"""What HD95 costs per patient volume, on the whole volume and on the masks' bounding box.

    python -m benchmarks.hd95_box ROOT     # e.g. the unpacked 40-patient sample

For each patient of ROOT (a kaggle_3m folder), the prediction is its true mask volume shifted
by 3 pixels and cut by a far spurious blob (so both surfaces and every distance are exercised),
and :func:`tlunet.volume_metrics.hd95` is timed against the same computation on the whole
volume (the code before the bounding box). Prints both totals, the ratio and whether every
value is identical. BENCHMARKS.md records the figures.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage


def _whole(pred: np.ndarray, truth: np.ndarray) -> float:
    from tlunet.volume_metrics import _surface

    sp, st = _surface(pred), _surface(truth)
    to_pred = ndimage.distance_transform_edt(~sp)
    to_truth = ndimage.distance_transform_edt(~st)
    return float(max(np.percentile(to_truth[sp], 95), np.percentile(to_pred[st], 95)))


def main(argv: list[str]) -> int:
    from tlunet.data.cache import read_mask
    from tlunet.data.index import index_kaggle3m
    from tlunet.volume_metrics import hd95

    if not argv or not Path(argv[0]).is_dir():
        print("usage: python -m benchmarks.hd95_box ROOT (a kaggle_3m folder)", file=sys.stderr)
        return 1
    records = index_kaggle3m(argv[0])
    volumes: dict[str, list[np.ndarray]] = {}
    for record in records:
        volumes.setdefault(record.patient, []).append(read_mask(record.mask_path) > 0)
    whole_s = box_s = 0.0
    same = measured = 0
    for masks in volumes.values():
        truth = np.stack(masks)
        if not truth.any():
            continue
        pred = np.roll(truth, 3, axis=2)
        pred[len(pred) // 2, 5:9, 5:9] = True  # a far blob
        started = time.perf_counter()
        whole = _whole(pred, truth)
        whole_s += time.perf_counter() - started
        started = time.perf_counter()
        box = hd95(pred, truth)
        box_s += time.perf_counter() - started
        measured += 1
        same += whole == box
    print(
        f"{measured} patients with tumour, {len(records)} slices: whole volume {whole_s:.2f} s, "
        f"bounding box {box_s:.2f} s ({whole_s / box_s:.1f}x); identical values: "
        f"{same} of {measured}"
    )
    return 0 if same == measured else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
