#!/usr/bin/env bash
# The embedded S3 (SeaweedFS on 127.0.0.1): up | down | status.
# A thin wrapper over `dist-diffusion stack`; state and data live in .stack/ (or $STACK_ROOT).
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
bin="$here/.venv/bin/dist-diffusion"
[ -x "$bin" ] || { echo "run 'make venv' first" >&2; exit 2; }
exec "$bin" stack "${1:?usage: $0 up|down|status}" --root "${STACK_ROOT:-$here/.stack}"
