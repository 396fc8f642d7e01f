"""The benchmarks of the source repository (like timm's ``benchmark.py``, outside the package):
``python -m benchmarks.bench`` or ``make bench``; their targets are in ``targets.yaml``."""
