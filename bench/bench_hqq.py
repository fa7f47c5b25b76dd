"""HQQ benchmark (issue 13): slimquant's `hqq` plugin beside the `hqq` package (mobiusml, 0.2.8) on SmolLM2-135M.

    python3 -m venv bench/out/hqq-venv && . bench/out/hqq-venv/bin/activate
    pip install -c constraints.txt torch==2.13.0
    DISABLE_CUDA=1 pip install -c constraints.txt --no-build-isolation setuptools hqq==0.2.8 einops termcolor
    pip install --no-deps -e core && pip install pluggy pydantic
    deactivate; python bench/bench_hqq.py [--only CASE ...]

Both quantize every decoder Linear data-free from the same fp32 weights (bench/common.py protocol; perplexity on
WikiText-2 test, 16 x 2048). The package's cases run its `Quantizer.quantize(W, nbits, group_size, optimize=True,
axis=1, round_zero=nbits == 4)`: what HQQLinear with `BaseQuantizeConfig(nbits, group_size)` calls (its solver in
0.2.8: lp_norm 0.7, beta 10, 20 iterations, early stop); the dequantized weights are written back. Timed alike, each
case in its own process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HQQ_PYTHON = common.OUT / "hqq-venv" / "bin" / "python"


def w(bits: int, group: int | None) -> dict:
    return {"weights": {"bits": bits, "symmetric": False, "group_size": group}, "algorithms": ["hqq"],
            "data_free": True}


CASES: dict[str, dict] = {
    "W4A16 g64 hqq": w(4, 64),
    "W4A16 g128 hqq": w(4, 128),
    "W3A16 g64 hqq": w(3, 64),
    "W4A16 g64 RTN": {"weights": {"bits": 4, "symmetric": False, "group_size": 64}, "data_free": True},
}
PACKAGE = {"hqq package W4 g64": (4, 64), "hqq package W4 g128": (4, 128), "hqq package W3 g64": (3, 64)}


def package_case(name: str) -> dict:
    import torch
    from hqq.core.quantize import Quantizer

    bits, group = PACKAGE[name]
    model, tokenizer = common.load_fp32()
    result = {"case": name, "model_mb": round(common.model_mb(model), 1)}
    linears = [m for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]
    common.release_free_memory()
    common.reset_peak_rss()
    result["rss_before_quant_mb"] = round(common.current_rss_mb(), 1)
    started = time.perf_counter()
    with torch.no_grad():
        for linear in linears:
            w_q, meta = Quantizer.quantize(linear.weight.data, nbits=bits, group_size=group, optimize=True, axis=1,
                                           bitpack=False, device="cpu", round_zero=bits == 4)
            linear.weight.data.copy_(Quantizer.dequantize(w_q, meta).reshape(linear.weight.shape))
    result.update(quant_seconds=round(time.perf_counter() - started, 1),
                  peak_rss_quant_mb=round(common.peak_rss_mb(), 1))
    result["ppl"] = round(common.perplexity(model, common.eval_tokens(tokenizer)), 3)
    return result


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="run only these cases")
    args = parser.parse_args()
    if args.case in PACKAGE:
        print(json.dumps(package_case(args.case)))
        return
    if args.case:
        print(json.dumps(common.quantize_and_measure(args.case, CASES[args.case])))
        return
    package = list(PACKAGE) if HQQ_PYTHON.exists() else []
    names = args.only or [n for pair in zip(CASES, package, strict=False) for n in pair] + list(CASES)[len(package):]
    common.ensure_fp32_cache()
    results = []
    for name in names:
        python = str(HQQ_PYTHON) if name in PACKAGE else sys.executable
        proc = subprocess.run([python, __file__, "--case", name], capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        results.append(json.loads(lines[-1]) if proc.returncode == 0 and lines else
                       {"case": name, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]})
        print(json.dumps(results[-1]), flush=True)
        common._merge_results(common.OUT / "hqq_results.json", results)


if __name__ == "__main__":
    main()
