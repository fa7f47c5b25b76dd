"""Quantization time only, several recipes back to back in one process on one loaded SmolLM2-135M (bench/common.py
protocol), in interleaved rounds, the fastest round of each kept: on a noisy machine the ratios of one run compare,
the absolute times do not. No perplexity (bench_nf4.py, bench_awq.py measure it).

    python bench/bench_quant_time.py --only "NF4 block64 data-free" "RTN W4 g64 data-free" --rounds 3
    python bench/bench_quant_time.py --only "GPTQ W4 g64" "AWQ W4 g64" --rounds 2
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

G64 = {"bits": 4, "group_size": 64}
CASES: dict[str, dict] = {
    "NF4 block64 data-free": {"weights": G64, "algorithms": ["nf4"], "data_free": True},
    "RTN W4 g64 data-free": {"weights": {**G64, "symmetric": True}, "algorithms": ["minmax"], "data_free": True},
    "GPTQ W4 g64": {"weights": {**G64, "symmetric": False}, "algorithms": ["gptq"]},
    "AWQ W4 g64": {"weights": {**G64, "symmetric": False}, "algorithms": ["awq"]},
}


def main() -> None:
    import slimquant

    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    common.ensure_fp32_cache()
    model, tokenizer = common.load_fp32()
    samples = common.calib_samples(tokenizer)
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name in args.only:
            recipe = {k: v for k, v in CASES[name].items() if k != "data_free"}
            copy_of_model = copy.deepcopy(model)
            started = time.perf_counter()
            slimquant.quantize(copy_of_model, {**recipe, "runtime": {"progress": False}},
                               samples=None if CASES[name].get("data_free") else samples)
            seconds = time.perf_counter() - started
            best[name] = min(best.get(name, seconds), seconds)
            print(json.dumps({"case": name, "seconds": round(seconds, 2)}), flush=True)
            del copy_of_model
    first = best[args.only[0]]
    print(f"\n| case | fastest of {args.rounds} rounds (s) | / {args.only[0]} |")
    print("| --- | --- | --- |")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.2f} | {seconds / first:.2f}x |")


if __name__ == "__main__":
    main()
