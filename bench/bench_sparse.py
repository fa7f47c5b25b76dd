"""Sparse benchmark (issue 15): SparseGPT pruning fused with quantization beside magnitude pruning + rounding, on
SmolLM2-135M (bench/common.py protocol: fp32 cache, WikiText-2 test perplexity 16 x 2048, calibration 32 x 512).

    python bench/bench_sparse.py [--only CASE ...]

Every decoder Linear is pruned and quantized; SparseGPT from the calibration Hessians, magnitude data-free. Each case
runs in its own process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

W8 = {"bits": 8, "symmetric": True}  # per channel
W4_G128 = {"bits": 4, "symmetric": False, "group_size": 128}


def sparse(weights: dict, **args) -> dict:
    return {"weights": weights, "algorithms": [{"name": "sparse", **args}],
            "data_free": args.get("method") == "magnitude"}


CASES: dict[str, dict] = {
    "50% W8 sparsegpt": sparse(W8, sparsity=0.5),
    "50% W8 magnitude": sparse(W8, sparsity=0.5, method="magnitude"),
    "2:4 W8 sparsegpt": sparse(W8, pattern="2:4"),
    "2:4 W8 magnitude": sparse(W8, pattern="2:4", method="magnitude"),
    "50% W4 g128 sparsegpt": sparse(W4_G128, sparsity=0.5),
    "50% W8 sparsegpt fraction 0.01": sparse(W8, sparsity=0.5, fraction=0.01),
}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="run only these cases")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(common.quantize_and_measure(args.case, CASES[args.case])))
        return
    common.run_cases(Path(__file__), args.only or list(CASES), "sparse_results.json")


if __name__ == "__main__":
    main()
