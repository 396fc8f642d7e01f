"""Pre-populate the Hugging Face cache with encoder weights (run where there is internet).

    python -m tlunet.models.download densenet121 vgg16 tu-resnet18

Then copy the cache (``~/.cache/huggingface`` or ``$HF_HOME``) to the offline machine.
"""

from __future__ import annotations

import argparse
import sys

from tlunet.errors import TlunetError
from tlunet.models.factory import build_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("encoders", nargs="+", help="smp encoder names or tu-<timm name>")
    parser.add_argument("--weights", default="imagenet")
    args = parser.parse_args(argv)
    for name in args.encoders:
        try:
            build_model("unet", name, args.weights)
        except TlunetError as exc:
            print(f"tlunet error: {exc}", file=sys.stderr)
            return 1
        print(f"cached: {name} ({args.weights})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
