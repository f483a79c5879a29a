#!/usr/bin/env bash
# The whole test suite (unit + integration against a private Mosquitto and real runtimes).
# Extra arguments go to pytest, e.g. scripts/test.sh -k bundle -x
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
exec .venv/bin/python -m pytest "$@"
