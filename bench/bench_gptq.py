"""GPTQ benchmark (issue 4): GPTQ against round-to-nearest (`minmax`) on SmolLM2-135M, WikiText-2 perplexity.

    python bench/bench_gptq.py                      # the main table
    python bench/bench_gptq.py --only "W4A16 g64 GPTQ mse" ...   # any case of CASES or EXTRA

Each case runs in a fresh process (bench/common.py): load the fp32 model, quantize (timed; peak RSS read right
after, before the perplexity evaluation), then perplexity on WikiText-2 test (16 x 2048 tokens). Calibration:
32 x 512 tokens of wiki.valid.tokens, or 128 x 512 where the case name says so. Results: bench/out/gptq_results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def w(bits: int, group_size: int | None) -> dict:
    return {"bits": bits, "symmetric": False, "group_size": group_size}


def rtn(weights: dict) -> dict:
    return {"weights": weights}


def gptq(weights: dict, **args) -> dict:
    return {"weights": weights, "algorithms": [{"name": "gptq", "act_order": False, "mse": False, **args}]}


G64, G128 = w(4, 64), w(4, 128)
CASES: dict[str, dict | None] = {
    "fp32": None,
    "W4A16 g128 RTN": rtn(G128),
    "W4A16 g128 GPTQ": gptq(G128),
    "W4A16 g128 GPTQ act_order": gptq(G128, act_order=True),
    "W4A16 g128 GPTQ true_sequential off": gptq(G128, true_sequential=False),
    "W4A16 g64 RTN": rtn(G64),
    "W4A16 g64 GPTQ": gptq(G64),
    "W4A16 g64 GPTQ act_order": gptq(G64, act_order=True),
    "W4A16 g64 GPTQ true_sequential off": gptq(G64, true_sequential=False),
    "W4A16 per-channel RTN": rtn(w(4, None)),
    "W4A16 per-channel GPTQ": gptq(w(4, None)),
    "W4A16 per-channel GPTQ act_order": gptq(w(4, None), act_order=True),
    "W3A16 g128 RTN": rtn(w(3, 128)),
    "W3A16 g128 GPTQ": gptq(w(3, 128)),
    "W3A16 g128 GPTQ act_order": gptq(w(3, 128), act_order=True),
}
EXTRA: dict[str, dict] = {  # what else was tried to reach the targets
    "W4A16 g128 RTN clip-search": {"weights": G128, "algorithms": [{"name": "minmax", "clip_search": True}]},
    "W4A16 g128 GPTQ mse": gptq(G128, mse=True),
    "W4A16 g128 GPTQ act_order mse": gptq(G128, act_order=True, mse=True),
    "W4A16 g128 GPTQ act_order static_groups": gptq(G128, act_order=True, static_groups=True),
    "W4A16 g128 GPTQ damp 0.1": gptq(G128, damp_percent=0.1),
    "W4A16 g128 GPTQ act_order 128x512": {**gptq(G128, act_order=True), "calib": 128},
    "W4A16 g64 GPTQ mse": gptq(G64, mse=True),
    "W4A16 g64 GPTQ act_order mse": gptq(G64, act_order=True, mse=True),
    "W4A16 g64 GPTQ act_order true_sequential off": gptq(G64, act_order=True, true_sequential=False),
    "W4A16 g64 GPTQ act_order static_groups": gptq(G64, act_order=True, static_groups=True),
    "W4A16 g64 GPTQ act_order true_sequential off mse": gptq(G64, act_order=True, true_sequential=False, mse=True),
    "W4A16 g128 GPTQ act_order true_sequential off mse": gptq(G128, act_order=True, true_sequential=False,
                                                              mse=True),
    "W4A16 g64 GPTQ act_order true_sequential off static_groups": gptq(G64, act_order=True, true_sequential=False,
                                                                       static_groups=True),
    "W4A16 g64 GPTQ damp 0.1": gptq(G64, damp_percent=0.1),
    "W4A16 g64 GPTQ act_order 128x512": {**gptq(G64, act_order=True), "calib": 128},
    "W4A16 g128 GPTQ symmetric": gptq({**G128, "symmetric": True}),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="run only these cases (of the main table or the extra ones)")
    parser.add_argument("--extra", action="store_true", help="run the extra cases after the main table")
    args = parser.parse_args()
    cases = {**CASES, **EXTRA}
    side_by_side = [n for n in common.llmcompressor_cases() if "W4A16" in n]
    if args.case:
        recipe = cases[args.case]
        count = (recipe or {}).get("calib", common.CALIB_SAMPLES)
        recipe = recipe and {k: v for k, v in recipe.items() if k != "calib"}
        print(json.dumps(common.quantize_and_measure(args.case, recipe, lambda tok: common.calib_samples(tok, count))))
        return
    names = args.only or list(CASES) + side_by_side + (list(EXTRA) if args.extra else [])
    unknown = [n for n in names if n not in cases and n not in side_by_side]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; cases: {list(cases)}")
    common.run_cases(Path(__file__), names, "gptq_results.json")


if __name__ == "__main__":
    main()
