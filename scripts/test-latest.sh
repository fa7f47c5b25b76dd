#!/usr/bin/env bash
# Runs the test suite against the newest releases of every dependency (torch stays at the pinned 2.13.0 CPU
# build), in a throw-away virtual environment, so that a release that breaks slimquant is seen before users see it.
#   bash scripts/test-latest.sh                 # test against the newest releases
#   bash scripts/test-latest.sh --write-lock    # ... and, if the suite passes, write them to constraints.txt
# Extra arguments after the flag go to pytest (e.g. -x -q).
set -euo pipefail
cd "$(dirname "$0")/.."

write_lock=0
if [ "${1:-}" = "--write-lock" ]; then write_lock=1; shift; fi

venv=$(mktemp -d "${TMPDIR:-/tmp}/slimquant-latest-XXXXXX")
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
. "$venv/bin/activate"
echo "torch==2.13.0" > "$venv/torch-only.txt"
SLIMQUANT_CONSTRAINTS="$venv/torch-only.txt" bash scripts/install.sh --dev --upgrade
# --all: setuptools is a dependency of torch and belongs in the lock; pip itself does not
python -m pip freeze --all --exclude-editable | grep -v -e '^-e ' -e '^pip==' > "$venv/freeze.txt"
echo "testing against:" && grep -iE '^(transformers|tokenizers|safetensors|pydantic|pluggy|numpy|accelerate|gguf)==' "$venv/freeze.txt"
python -m pytest -p no:cacheprovider "$@"

if [ "$write_lock" = 1 ]; then
    {
        echo "# The lock: every runtime and test dependency at the version the suite last passed with."
        echo "# Refresh with: bash scripts/test-latest.sh --write-lock (writes this file only if the suite passes)."
        echo "# torch is the 2.13.0 CPU build; an unpinned torch pulls a several-GB CUDA build."
        sed -E 's/^torch==2\.13\.0\+cpu$/torch==2.13.0/' "$venv/freeze.txt" | grep -vE '^(slimquant|slimquant-)'
    } > constraints.txt.new
    mv constraints.txt.new constraints.txt
    echo "constraints.txt updated"
fi
