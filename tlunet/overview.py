"""Dataset overview: ``python -m tlunet.overview DATA_ROOT [--output overview.png]``.

Prints the number of patients, slices and slices with tumour, and draws examples with and
without tumour channel by channel (pre-contrast, FLAIR, post-contrast, RGB, mask contour).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from tlunet.cli import returns_status
from tlunet.data.cache import decode_slices
from tlunet.data.index import index_kaggle3m
from tlunet.viz import plot_dataset_overview


@returns_status
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tlunet.overview", description=__doc__)
    parser.add_argument("root", help="a kaggle_3m folder (one folder per patient)")
    parser.add_argument("--output", default="overview.png")
    parser.add_argument("--per-class", type=int, default=3, help="examples with and without tumour")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    records = index_kaggle3m(args.root)
    decoded = decode_slices(records, args.root)
    has = decoded.has_tumour
    patients = sorted({r.patient for r in records})
    print(
        f"{args.root}: {len(patients)} patients, {len(records)} slices, "
        f"{int(has.sum())} with tumour ({100 * has.mean():.1f} %)"
    )
    rng = np.random.default_rng(args.seed)
    picks = []
    for flag in (True, False):
        rows = np.flatnonzero(has == flag)
        picks += rng.choice(rows, size=min(args.per_class, len(rows)), replace=False).tolist()
    titles = [
        f"{records[i].patient} #{records[i].slice} ({'tumour' if has[i] else 'no tumour'})"
        for i in picks
    ]
    path = plot_dataset_overview(decoded.images[picks], decoded.masks[picks], titles, args.output)
    print(f"overview: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
