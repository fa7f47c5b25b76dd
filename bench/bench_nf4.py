"""NF4 benchmark (issue 15): slimquant's `nf4` plugin on SmolLM2-135M, data-free, double-quantized, and as the grid
under GPTQ (`[nf4, gptq]`).

    python bench/bench_nf4.py [--only CASE ...]

bench/common.py protocol (fp32 cache, WikiText-2 test perplexity, 16 x 2048; GPTQ calibrates on its default
samples); each case in its own process. Besides perplexity, each case reports the bytes per quantized weight of
what `save_quantized` would write for the decoder Linears (codes, scales, codebook; from the exact tensors).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

WEIGHTS = {"bits": 4, "group_size": 64}
CASES: dict[str, dict] = {
    "NF4 block64 data-free": {"weights": WEIGHTS, "algorithms": ["nf4"], "data_free": True},
    "NF4 block64 double-quant": {"weights": WEIGHTS, "algorithms": [{"name": "nf4", "double_quant": True}],
                                 "data_free": True},
    "NF4 block64 + gptq": {"weights": WEIGHTS, "algorithms": ["nf4", "gptq"]},
    "RTN W4 g64 data-free (speed reference)": {"weights": {**WEIGHTS, "symmetric": True}, "algorithms": ["minmax"],
                                               "data_free": True},
}


def saved_bytes_per_weight(model) -> float:
    """Bytes of every tensor a quantized Linear writes (packed codes, scales, codebook, ...) per quantized weight."""
    from slimquant.export.layout import build_layout

    layout = build_layout(model)
    stored = sum(t.numel() * t.element_size() for k, t in layout.tensors.items() if layout.owner[k] is not None)
    weights = sum(lin["in_features"] * lin["out_features"] for lin in layout.linears.values())
    return stored / weights


def case(name: str) -> dict:
    import slimquant

    recipe = dict(CASES[name])
    data_free = recipe.pop("data_free", False)
    model, tokenizer = common.load_fp32()
    result = {"case": name, "model_mb": round(common.model_mb(model), 1)}
    samples = None if data_free else common.calib_samples(tokenizer)
    common.release_free_memory()
    common.reset_peak_rss()
    with common.Timer() as t:
        slimquant.quantize(model, {**recipe, "runtime": {"progress": False}}, samples=samples)
    result.update(quant_seconds=round(t.seconds, 1), peak_rss_quant_mb=round(common.peak_rss_mb(), 1),
                  bytes_per_weight=round(saved_bytes_per_weight(model), 4))
    result["ppl"] = round(common.perplexity(model, common.eval_tokens(tokenizer)), 3)
    return result


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="run only these cases")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(case(args.case)))
        return
    unknown = [n for n in args.only or [] if n not in CASES]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; cases: {list(CASES)}")
    results = common.run_cases(Path(__file__), args.only or list(CASES), "nf4_results.json")
    print("\n| case | bytes / quantized weight on disk |\n| --- | --- |")
    for r in results:
        print(f"| {r['case']} | {r.get('bytes_per_weight', '-')} |")


if __name__ == "__main__":
    main()
