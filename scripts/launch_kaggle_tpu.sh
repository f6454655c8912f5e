#!/usr/bin/env bash
# Kaggle notebook on the "TPU VM v3-8" accelerator (one host, 8 cores x 16 GiB): installs kerasft
# with JAX for TPU and runs one config. In a notebook cell, from a kerasft checkout:
#   !bash scripts/launch_kaggle_tpu.sh configs/gemma_7b_tpu_v3_8.yaml
#   !bash scripts/launch_kaggle_tpu.sh configs/gemma2_9b_tpu_v3_8.yaml train.epochs=1
# The Gemma weights come from Kaggle: accept the model's licence on kaggle.com first; inside a Kaggle
# notebook kagglehub signs in by itself (elsewhere set KAGGLE_USERNAME and KAGGLE_KEY).
# One host is one process, so runtime.distributed (auto) stays off. TPU pods: docs/SCALE.md.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q --disable-pip-version-check -e ".[verify,eval]" "jax[tpu]"
export KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=3
exec kerasft run "$@"
