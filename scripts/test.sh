#!/usr/bin/env bash
# The whole test suite (unit + integration against a private Mosquitto and real runtimes),
# then the TFLite tests again under tflite-runtime 2.14 in its own numpy<2 environment.
# Extra arguments go to pytest, e.g. scripts/test.sh -k bundle -x
# (EDGEWARD_LEGACY_TFLITE=skip leaves the second environment out.)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
.venv/bin/python -m pytest "$@"
if [ "${EDGEWARD_LEGACY_TFLITE:-}" != skip ]; then
  bash scripts/test-tflite-runtime.sh -q
fi
