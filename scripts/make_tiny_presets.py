"""Writes the tiny random Gemma presets the tests build, for inspection.

Usage: python scripts/make_tiny_presets.py OUT_DIR
Writes OUT_DIR/{gemma,gemma2,gemma3}/ (keras-hub presets) and
OUT_DIR/tokenizer.model (the tiny SentencePiece model) in a few seconds.
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

# The same builders make the tests' fixtures (tests/conftest.py).
from kerasft.testing import FAMILIES, build_tiny_preset, write_tiny_spm  # noqa: E402


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
