#!/usr/bin/env bash
# Installs kerasft with its test extras into .venv and runs the default (CPU, offline) test suite on
# both cores (pytest-xdist; a worker steals tests from the other when it runs out).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the real-model tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# torch is pinned to the CPU build this machine kind ships; elsewhere pip fetches the same version.
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]" "torch==2.13.0"
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist worksteal --durations=20 "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit "$status"
