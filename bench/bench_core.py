"""Core benchmark (issue 2): round-to-nearest weights and calibrated activations with the built-in `minmax`.

    python bench/bench_core.py [--only CASE ...]

Each case runs in a fresh process: load the fp32 model, quantize (timed; peak RSS read right after, before the
perplexity evaluation whose 2048 x 49152 logits would dominate it), then perplexity on WikiText-2 test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

W4 = {"bits": 4, "symmetric": False}
CASES: dict[str, dict | None] = {
    "fp32": None,
    "W8A16 per-channel": {"scheme": "W8A16"},
    "W4A16 per-channel": {"weights": W4},
    "W4A16 g128": {"weights": {**W4, "group_size": 128}},
    "W4A16 g64": {"weights": {**W4, "group_size": 64}},
    "W4A16 g128 clip-search": {"weights": {**W4, "group_size": 128}, "algorithms": [{"name": "minmax",
                                                                                       "clip_search": True}]},
    "W8A8 static act_method 1": {"scheme": "W8A8", "algorithms": [{"name": "minmax", "act_method": 1}]},
    "W8A8 static act_method 2": {"scheme": "W8A8", "algorithms": [{"name": "minmax", "act_method": 2}]},
    "W8A8 static act_method 3": {"scheme": "W8A8", "algorithms": [{"name": "minmax", "act_method": 3}]},
    "W8A8 dynamic per-token": {"scheme": "W8A8_DYNAMIC"},
}


def run_case(name: str) -> dict:
    import slimquant

    model, tokenizer = common.load_fp32()
    rss_loaded = common.current_rss_mb()
    result = {"case": name, "model_mb": round(common.model_mb(model), 1), "rss_after_load_mb": round(rss_loaded, 1)}
    recipe = CASES[name]
    if recipe is not None:
        samples = common.calib_samples(tokenizer)
        with common.Timer() as t:
            slimquant.quantize(model, {**recipe, "runtime": {"progress": False}}, samples=samples)
        result.update(quant_seconds=round(t.seconds, 1), peak_rss_quant_mb=round(common.peak_rss_mb(), 1))
    result["ppl"] = round(common.perplexity(model, common.eval_tokens(tokenizer)), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="run only these cases")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    common.ensure_fp32_cache()
    names = args.only or list(CASES)
    results = []
    for name in names:
        results.append(common.run_isolated(Path(__file__), name))
        print(json.dumps(results[-1]), flush=True)
    fp32 = next((r["ppl"] for r in results if r["case"] == "fp32" and "ppl" in r), 20.82)
    print("\n| case | perplexity | vs fp32 | quant time (s) | peak RSS (MB) | RSS after load (MB) | peak / fp32 model |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['case']} | failed: {r['error']} | | | | | |")
            continue
        peak = r.get("peak_rss_quant_mb")
        ratio = f"{peak / r['model_mb']:.2f}" if peak else "-"
        print(f"| {r['case']} | {r['ppl']:.2f} | {100 * (r['ppl'] / fp32 - 1):+.2f}% | {r.get('quant_seconds', '-')} "
              f"| {peak or '-'} | {r['rss_after_load_mb']} | {ratio} |")
    common.OUT.mkdir(exist_ok=True)
    (common.OUT / "core_results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
