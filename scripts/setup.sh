#!/usr/bin/env bash
# Create the project's virtual environment (.venv) and install fedrlhf into it with its
# test extras. Idempotent: reinstalls only when pyproject.toml or the constraints change.
# Torch is pinned to the CPU build on this machine's disk (constraints/torch-cpu.txt) so
# no CUDA build is downloaded; set FEDRLHF_CONSTRAINTS="" to use your own torch instead.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${FEDRLHF_VENV:-.venv}"
python="${PYTHON:-python3}"
constraints="${FEDRLHF_CONSTRAINTS-constraints/torch-cpu.txt}"

if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv"
    "$python" -m venv "$venv"
fi
stamp="$venv/.fedrlhf-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || { [ -n "$constraints" ] && [ "$constraints" -nt "$stamp" ]; }; then
    echo "setup: installing fedrlhf and its dependencies into $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        ${constraints:+--constraint "$constraints"} --editable ".[dev]"
    touch "$stamp"
fi
