#!/usr/bin/env bash
# The board-side tests again on the oldest stack edgeward supports, in its own environment
# (.venv-legacy: edgeward[device-legacy,dev] under scripts/oldest-board.txt, re-made when either
# changes): Python 3.10 where the machine has it (Ubuntu 22.04 / JetPack 6), numpy < 2,
# tflite-runtime 2.14 (the fallback for boards without an ai-edge-litert wheel) and onnxruntime
# 1.17. It runs bundles that today's converter writes, and the agent end to end over MQTT: the
# main environment converts the bundles (this one has no onnx and no LiteRT schema) and hands
# them over in a folder.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
(source scripts/bootstrap.sh)
oldest_python() {  # Python 3.10 where one runs (a pyenv shim may exist without it), else python3
  local c
  for c in python3.10 "$HOME"/.pyenv/versions/3.10*/bin/python3.10 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import venv, ensurepip' >/dev/null 2>&1; then
      command -v "$c"; return
    fi
  done
}
PY=${PYTHON_OLDEST:-$(oldest_python)}
ENV=.venv-legacy
key=$(cat pyproject.toml scripts/oldest-board.txt | sha256sum | cut -c1-16)
ort=$(sed -n 's/^onnxruntime==//p' scripts/oldest-board.txt)
if [ "$(cat "$ENV/.edgeward-installed" 2>/dev/null)" != "$key" ]; then
  echo "edgeward: making $ENV with $("$PY" --version), tflite-runtime 2.14, onnxruntime $ort and numpy<2" >&2
  rm -rf "$ENV"
  "$PY" -m venv "$ENV"
  if ! { "$ENV/bin/python" -m pip install -q --upgrade pip &&
         "$ENV/bin/python" -m pip install -q -c scripts/oldest-board.txt -e ".[device-legacy,dev]"; } \
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
for kit in tflitekit:converted onnxkit:onnx conftest:assets; do
  .venv/bin/python "tests/${kit%%:*}.py" "$fixture/${kit##*:}" >/dev/null 2>&1 ||
    { echo "edgeward: converting the ${kit%%:*} fixtures failed" >&2; .venv/bin/python "tests/${kit%%:*}.py" "$fixture/${kit##*:}"; exit 1; }
done
"$ENV/bin/python" -c 'import sys, numpy, onnxruntime, tflite_runtime; print(f"edgeward: oldest board: python {sys.version.split()[0]}, tflite-runtime {tflite_runtime.__version__}, onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}")' >&2
# the TFLite and ONNX bundles, then the agent end to end over MQTT (deploys, transfers, the store)
# on this stack; the tests that edit ONNX files need the onnx package and stay in the main run
EDGEWARD_TFLITE_FIXTURE=$fixture EDGEWARD_EXPECT_TFLITE=tflite_runtime \
EDGEWARD_ONNX_FIXTURE=$fixture/onnx EDGEWARD_EXPECT_ORT=$ort EDGEWARD_ASSETS=$fixture/assets \
  "$ENV/bin/python" -m pytest -p no:cacheprovider tests/test_tflite.py tests/test_old_runtimes.py \
  tests/test_agent_mqtt.py tests/test_transfer.py tests/test_store_engine.py \
  --deselect tests/test_old_runtimes.py::test_the_converter_stamps_each_onnx_file_for_old_runtimes \
  --deselect tests/test_store_engine.py::test_a_model_newer_than_this_onnxruntime_is_refused_at_load_with_the_fix "$@"
