#!/usr/bin/env bash
# Set up (first time) and run the default simulation end to end; the report and plots
# land in runs/simulation/ (override with --out DIR; see `fedrlhf simulate --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fedrlhf simulate --out runs/simulation "$@"
