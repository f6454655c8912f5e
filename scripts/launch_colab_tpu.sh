#!/usr/bin/env bash
# Colab notebook on a TPU runtime (one host; Colab offers TPU v5e-1 and v6e-1: one chip, 16 / 32 GB):
# installs kerasft with JAX for TPU and runs one config. In a cell, from a kerasft checkout:
#   !bash scripts/launch_colab_tpu.sh configs/gemma3_1b_t4.yaml model.dtype=bfloat16
# (the T4 config in bfloat16, which TPUs compute natively). Check a config against the chip first:
#   kerasft plan CONFIG --target tpu-v5e-8 runtime.mesh=none   (per-chip figures for a v5e chip)
# The Gemma weights come from Kaggle: accept the licence on kaggle.com and put KAGGLE_USERNAME and
# KAGGLE_KEY in Colab's secrets, exported to the environment before this script runs.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q --disable-pip-version-check -e ".[verify,eval]" "jax[tpu]"
export KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=3
exec kerasft run "$@"
