#!/usr/bin/env bash
# The accelerator acceptance run (issue 19) on one GPU or one TPU host: installs kerasft with JAX for
# the accelerator into .venv and runs `kerasft bench --accelerator` once (Gemma 2 2B architecture with
# random bfloat16 weights, no download; under 8 minutes expected, killed at 12):
#   scripts/accelerator_acceptance.sh gpu          # NVIDIA GPU with a CUDA 12 driver
#   scripts/accelerator_acceptance.sh tpu          # a Cloud TPU VM
#   scripts/accelerator_acceptance.sh installed    # no install: the python3 on PATH has kerasft's needs
# Extra arguments go to `kerasft bench` (--batch, --steps, --out). Writes acceptance/acceptance.json,
# acceptance.md and plan.txt; docs/BENCHMARKS.md says where their figures go.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:?usage: scripts/accelerator_acceptance.sh gpu|tpu|installed [kerasft bench options]}
shift
case "$kind" in
  gpu) jax_extra="jax[cuda12]" ;;
  tpu) jax_extra="jax[tpu]" ;;
  installed) jax_extra="" ;;
  *) echo "accelerator_acceptance.sh: $kind is not gpu, tpu or installed" >&2; exit 2 ;;
esac
python=python3
if [ -n "$jax_extra" ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -e ".[verify]" "$jax_extra"
  python=.venv/bin/python
fi
# JAX's pool: 92 % of the card, as scripts/launch_local_gpu.sh gives training (the plan keeps 90 %).
export KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=3 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 PYTHONUNBUFFERED=1
exec timeout 720 "$python" -m kerasft bench --accelerator --out acceptance "$@"
