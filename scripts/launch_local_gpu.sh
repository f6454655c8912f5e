#!/usr/bin/env bash
# A local NVIDIA GPU (e.g. a 24 GB RTX 4090, CUDA 12 driver): installs kerasft with JAX for CUDA into
# .venv and runs one config:
#   scripts/launch_local_gpu.sh configs/gemma2_2b_4090.yaml
#   scripts/launch_local_gpu.sh configs/gemma2_2b_4090.yaml train.batch_size=4 data.sequence_length=1024
# Check the config against the card first: .venv/bin/kerasft plan CONFIG --target 4090
# The Gemma weights come from Kaggle: accept the licence on kaggle.com, set KAGGLE_USERNAME and KAGGLE_KEY.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e ".[verify,eval]" "jax[cuda12]"
# JAX takes 75 % of the card by default; `kerasft plan` plans for 90 % of it.
export KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=3 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
exec .venv/bin/kerasft run "$@"
