#!/usr/bin/env bash
# The whole test suite (unit + integration against a private Mosquitto and real runtimes),
# then the board-side tests again on the oldest board stack (Python 3.10, tflite-runtime 2.14,
# onnxruntime 1.17, numpy<2) in its own environment.
# Extra arguments go to pytest, e.g. scripts/test.sh -k bundle -x
# (EDGEWARD_LEGACY_TFLITE=skip leaves the second environment out.)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
.venv/bin/python -m pytest "$@"
if [ "${EDGEWARD_LEGACY_TFLITE:-}" != skip ]; then
  bash scripts/test-oldest-board.sh -q
fi
