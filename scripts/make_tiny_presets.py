"""Writes the tiny random Gemma presets the tests build, for inspection.

Usage: python scripts/make_tiny_presets.py OUT_DIR
Writes OUT_DIR/{gemma,gemma2,gemma3}/ (keras-hub presets) and
OUT_DIR/tokenizer.model (the tiny SentencePiece model) in a few seconds.
"""

import argparse
import os
import sys
from pathlib import Path

# The builders live with the tests, which use them to make their fixtures.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("KERAS_BACKEND", "jax")

from tiny_models import FAMILIES, build_tiny_preset, write_tiny_spm  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_spm(args.out_dir / "tokenizer.model"))
    for family in FAMILIES:
        print(build_tiny_preset(family, args.out_dir / family, seed=args.seed))


if __name__ == "__main__":
    main()
