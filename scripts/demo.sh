#!/usr/bin/env bash
# The main job: sets up .venv, builds from source, runs the demo (extra args go to the demo).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
source "$repo/scripts/setup_env.sh" >&2
cd /
"$venv/bin/python" -m r2lm_kernels.demo "$@"
