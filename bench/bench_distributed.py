"""torch.distributed: SmolLM2-135M fp32 GPTQ W4A16 g64 (asymmetric, defaults) quantized by 1 process x 1 thread and
by `torchrun --nproc-per-node 2` x 1 thread each, calibration 32 x 512 tokens of wiki.valid.tokens, through the CLI.

The quantization time is the CLI's own ("quantization time (s)": calibration, quantization and the passes, without
loading the model); perplexity is measured afterwards on the saved outputs by `slimquant eval` (WikiText-2 test,
16 x 2048 windows, all threads), and the saved tensors of the two runs are compared.

    python bench/bench_distributed.py [--processes 2]
    python bench/bench_distributed.py --exact    # act order off and float32 passes: compare codes only

With act order, a Hessian summed in another order can tie-break its diagonal differently and permute the columns
differently, so the codes of the two runs differ while their accuracy does not; --exact shows that the codes are
the same once the order is fixed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from common import CALIB_SAMPLES, CALIB_SEQLEN, DATA, EVAL_WINDOW, EVAL_WINDOWS, OUT, ensure_fp32_cache

WORK = OUT / "distributed"


EXACT_RECIPE = """scheme: W4A16
weights: {bits: 4, group_size: 64, symmetric: false}
algorithms: [{name: gptq, act_order: false}]
runtime: {calibration_dtype: model}
"""


def quantize(output: Path, processes: int, recipe: Path | None = None) -> float:
    launcher = [sys.executable]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
    scheme = [str(recipe)] if recipe else ["--scheme", "W4A16", "-a", "gptq", "--group-size", "64", "--w-asym"]
    command = [*launcher, "-m", "slimquant", "quantize", *scheme, "--model", str(ensure_fp32_cache()),
               "--calib-file", str(DATA / "wiki.valid.tokens"),
               "--num-samples", str(CALIB_SAMPLES), "--seqlen", str(CALIB_SEQLEN), "--kl-samples", "0",
               "--device", "cpu", "-o", str(output)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    match = re.search(r"quantization time \(s\)\s*│\s*([\d.]+)", result.stdout + result.stderr)
    return float(match.group(1))


def perplexity(output: Path) -> float:
    report = output.with_suffix(".eval.json")
    command = [sys.executable, "-m", "slimquant", "eval", str(output), "--model", str(ensure_fp32_cache()),
               "--text", str(DATA / "wiki.test.raw"), "--windows", str(EVAL_WINDOWS), "--window", str(EVAL_WINDOW),
               "--kl-samples", "0", "--report", str(report)]
    subprocess.run(command, check=True, capture_output=True)
    return json.loads(report.read_text())["ppl_quantized"]


def compare(a: Path, b: Path) -> str:
    import torch
    from safetensors.torch import load_file

    (fa,), (fb,) = a.glob("*.safetensors"), b.glob("*.safetensors")
    ta, tb = load_file(str(fa)), load_file(str(fb))
    codes = [k for k in ta if not ta[k].is_floating_point() and k.endswith(".weight")]
    same = sum(int(torch.equal(ta[k], tb[k])) for k in codes)
    differing = sum(int((ta[k] != tb[k]).sum()) for k in codes)
    total = sum(ta[k].numel() for k in codes)
    scales = [k for k in ta if k.endswith(".weight_scale")]
    worst = max(float(((ta[k] - tb[k]).abs() / ta[k].abs().clamp_min(1e-12)).max()) for k in scales)
    return (f"{same} of {len(codes)} quantized Linears with identical codes; {differing} of {total} code bytes "
            f"differ; largest relative scale difference {worst:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--exact", action="store_true")
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    if args.exact:
        recipe = WORK / "exact.yaml"
        recipe.write_text(EXACT_RECIPE)
        for processes in (1, args.processes):
            seconds = quantize(WORK / f"{processes}x1", processes, recipe)
            print(json.dumps({"processes": processes, "threads_each": 1, "quant_seconds": seconds}), flush=True)
        print(compare(WORK / "1x1", WORK / f"{args.processes}x1"))
        return
    rows = []
    for processes in (1, args.processes):
        output = WORK / f"{processes}x1"
        seconds = quantize(output, processes)
        rows.append((processes, seconds, perplexity(output)))
        print(json.dumps({"processes": processes, "threads_each": 1, "quant_seconds": seconds, "ppl": rows[-1][2]}),
              flush=True)
    print(compare(WORK / "1x1", WORK / f"{args.processes}x1"))
    print("\n| processes x threads | quantization time (s) | speed-up | perplexity |")
    print("| --- | --- | --- | --- |")
    for processes, seconds, ppl in rows:
        print(f"| {processes} x 1 | {seconds:.1f} | {rows[0][1] / seconds:.2f}x | {ppl:.3f} |")


if __name__ == "__main__":
    main()
