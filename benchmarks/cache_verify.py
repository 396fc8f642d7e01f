"""What verifying the decoded-slice cache costs when the cache is not in the page cache.

    python -m benchmarks.cache_verify [ROOT]   # as root (it drops the page cache)

ROOT defaults to the bench's synthetic full-size set (3929 slices, made by
``python -m benchmarks.bench --sections=start``). Builds or reuses the cache of ROOT in a
private folder, drops the page cache (``echo 3 > /proc/sys/vm/drop_caches``), then times the
warm start (index + opening the cache) four times: from the disk, checksums verified; from the
page cache within the hour of that verification (not hashed again); from the page cache,
checksums verified (the stamp removed); from the disk again, within the hour (not hashed). docs/reliability.md records the figures.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    from tlunet.data.cache import decode_slices
    from tlunet.data.index import index_kaggle3m

    cache_root = Path(os.environ.get("TLUNET_CACHE_DIR", Path.home() / ".cache" / "tlunet"))
    root = Path(argv[0]) if argv else cache_root / "bench" / "synthetic-3929"
    if not root.is_dir():
        print(f"error: no data at '{root}': run python -m benchmarks.bench --sections=start first")
        return 1
    with tempfile.TemporaryDirectory(dir=cache_root) as cache:
        records = index_kaggle3m(root)
        decode_slices(records, root, cache)  # build
        folder = next(p for p in Path(cache).iterdir() if (p / "meta.json").is_file())
        time.sleep(2.1)  # past cache.CTIME_MARGIN_NS: a stamp written now counts

        def drop() -> None:
            subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=True)

        try:
            drop()
        except subprocess.CalledProcessError:
            print("error: cannot drop the page cache (needs root)")
            return 1

        def timed(label: str) -> None:
            started = time.perf_counter()
            decoded = decode_slices(index_kaggle3m(root), root, cache)
            took = time.perf_counter() - started
            size = (decoded.images.nbytes + decoded.masks.nbytes) / 1e9
            print(f"warm start, {label}: {took:.3f} s ({len(decoded.masks)} slices, {size:.2f} GB)")

        timed("from the disk (page cache dropped), checksums verified")
        timed("from the page cache, verified within the hour: not hashed")
        (folder / "verified").unlink()
        timed("from the page cache, checksums verified")
        drop()
        timed("from the disk (page cache dropped), verified within the hour: not hashed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
