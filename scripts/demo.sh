#!/usr/bin/env bash
# The whole job end to end on this machine: private broker, model, conversion, agent,
# inference, a model update over MQTT, telemetry, clean stop. See scripts/demo.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
exec .venv/bin/python scripts/demo.py "$@"
