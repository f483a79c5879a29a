#!/usr/bin/env bash
# The TFLite tests again under tflite-runtime 2.14, the fallback for boards without an
# ai-edge-litert wheel. It needs numpy < 2, so it gets its own small environment
# (.venv-legacy: edgeward[device-legacy,dev], re-made when pyproject.toml changes).
# The models are written and converted by the main environment (LiteRT's schema lives in ai-edge-litert).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
(source scripts/bootstrap.sh)
PY=${PYTHON:-python3}
ENV=.venv-legacy
key=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$ENV/.edgeward-installed" 2>/dev/null)" != "$key" ]; then
  echo "edgeward: making $ENV with tflite-runtime 2.14 and numpy<2" >&2
  rm -rf "$ENV"
  "$PY" -m venv "$ENV"
  if ! { "$ENV/bin/python" -m pip install -q --upgrade pip && "$ENV/bin/python" -m pip install -q -e ".[device-legacy,dev]"; } \
       >"$ENV/pip.log" 2>&1; then
    tail -30 "$ENV/pip.log" >&2; echo "edgeward: installing $ENV failed (log: $ENV/pip.log)" >&2; exit 1
  fi
  echo "$key" > "$ENV/.edgeward-installed"
fi
fixture=$(mktemp -d)
trap 'rm -rf "$fixture"' EXIT
.venv/bin/python - "$fixture" <<'PY'
import sys
import numpy as np
from converters.zoo import build_tflite_mlp
_, weights = build_tflite_mlp(f"{sys.argv[1]}/mlp.tflite")
np.savez(f"{sys.argv[1]}/weights.npz", **weights)
PY
.venv/bin/python tests/tflitekit.py "$fixture/converted" >/dev/null 2>&1 ||
  { echo "edgeward: converting the TFLite fixtures failed" >&2; .venv/bin/python tests/tflitekit.py "$fixture/converted"; exit 1; }
"$ENV/bin/python" -c 'import numpy, tflite_runtime; print(f"edgeward: tflite-runtime {tflite_runtime.__version__}, numpy {numpy.__version__}")' >&2
EDGEWARD_TFLITE_FIXTURE=$fixture EDGEWARD_EXPECT_TFLITE=tflite_runtime \
  "$ENV/bin/python" -m pytest -p no:cacheprovider tests/test_tflite.py "$@"
