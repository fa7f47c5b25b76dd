"""Resume after SIGKILL on the real model: SmolLM2-135M fp32, GPTQ W4A16 g64, calibration --samples x 512 tokens of
wiki.valid.tokens (32 by default, the bench protocol), through the CLI in subprocesses.

1. an uninterrupted `slimquant quantize ... -o A`;
2. the same command with `-o B`, killed with SIGKILL as soon as its checkpoint manifest records layer k;
3. the same command with `-o B --resume`;
then the sha256 of every file of A and B are compared.

    python bench/bench_resume.py [--kill-after 10] [--samples 32]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import CALIB_SAMPLES, CALIB_SEQLEN, DATA, OUT, ensure_fp32_cache

from slimquant.export.names import sha256_file

WORK = OUT / "resume"


SAMPLES = [CALIB_SAMPLES]


def command(output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", "from slimquant.cli import main; main()", "quantize",
            "--model", str(ensure_fp32_cache()), "--scheme", "W4A16", "-a", "gptq", "--group-size", "64",
            "--calib-file", str(DATA / "wiki.valid.tokens"), "--num-samples", str(SAMPLES[0]),
            "--seqlen", str(CALIB_SEQLEN), "--kl-samples", "0", "--device", "cpu", "-o", str(output), *extra]


def finished_layers(checkpoint: Path) -> int:
    try:
        return len(json.loads((checkpoint / "manifest.json").read_text())["layers"])
    except (OSError, ValueError, KeyError):
        return 0


def run_killed(output: Path, kill_after: int) -> tuple[float, int]:
    """Start a run and SIGKILL it once its manifest records `kill_after` finished layers."""
    started = time.perf_counter()
    process = subprocess.Popen(command(output), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = Path(f"{output}.checkpoint")
    while process.poll() is None and finished_layers(checkpoint) < kill_after:
        time.sleep(0.05)
    if process.poll() is not None:
        raise SystemExit(f"the run ended (exit {process.returncode}) before layer {kill_after} was checkpointed")
    process.send_signal(signal.SIGKILL)
    process.wait()
    return time.perf_counter() - started, finished_layers(checkpoint)


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def hashes(directory: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-after", type=int, default=10, help="SIGKILL once this many layers are checkpointed")
    parser.add_argument("--samples", type=int, default=CALIB_SAMPLES, help="calibration samples of 512 tokens")
    args = parser.parse_args()
    SAMPLES[0] = args.samples
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    a, b = WORK / "uninterrupted", WORK / "resumed"
    uninterrupted_s = timed(command(a))
    killed_s, checkpointed = run_killed(b, args.kill_after)
    checkpoint = Path(f"{b}.checkpoint")
    checkpoint_mb = sum(p.stat().st_size for p in checkpoint.iterdir()) / 2**20
    resumed_s = timed(command(b, "--resume"))
    same = hashes(a) == hashes(b)
    result = {"samples": args.samples, "uninterrupted_s": round(uninterrupted_s, 1),
              "killed_after_s": round(killed_s, 1),
              "layers_checkpointed_at_kill": checkpointed, "checkpoint_mb_at_kill": round(checkpoint_mb, 1),
              "resume_s": round(resumed_s, 1), "files": len(hashes(a)), "identical": same,
              "checkpoint_removed": not checkpoint.exists()}
    print(json.dumps(result, indent=1))
    (OUT / "resume_results.json").write_text(json.dumps(result, indent=1))
    if not same:
        raise SystemExit("the resumed output differs from the uninterrupted one")


if __name__ == "__main__":
    main()
