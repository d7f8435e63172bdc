#!/usr/bin/env bash
# The test command: sets up .venv, builds from source, runs the test suite (extra args go to pytest).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
source "$repo/scripts/setup_env.sh"
cd "$repo"
# The pytest entry point (not `python -m pytest`) keeps the source tree off sys.path, so the tests import
# the installed package with its compiled extension.
"$venv/bin/pytest" python_tests "$@"
