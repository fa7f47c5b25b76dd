"""Sparse benchmark (issue 15): SparseGPT pruning fused with quantization, with and without outliers, beside magnitude
pruning + rounding and beside llm-compressor's SparseGPTModifier, on SmolLM2-135M (bench/common.py protocol: fp32
cache, WikiText-2 test perplexity 16 x 2048, calibration 32 x 512).

    python bench/bench_sparse.py                    # every case below, then llm-compressor's SparseGPT cases
    python bench/bench_sparse.py --only "50% W8 sparsegpt" "50% W8 magnitude" ...
    python bench/bench_sparse.py --list             # the case names (llm-compressor's included when its venv exists)

The matrix: pattern (50% unstructured, 2:4) x weights (W8 per-channel symmetric, W4 g128 asymmetric) x method:

- `sparsegpt`: SparseGPT from the calibration Hessians, no outliers;
- `sparsegpt fraction 0.01`: the same with outlier protection (at most 1% of each Linear's weights kept as float16
  outliers, the plugin's default sigma_factor 3.0);
- `magnitude`: prune the smallest |w| per Linear and round to nearest, data-free.

Every decoder Linear is pruned and quantized. Each case runs in its own process; after the timed quantization and the
perplexity, the case saves the model (msModelSlim layout, `save_type: safe_tensor`, into a temporary folder under
bench/out/) and reads the files back (`slimquant_sparse.saved_sparsity`), reporting:

- `sparsity`: the fraction of zero weights over all quantized decoder Linears, as dequantized from the saved files
  with the outliers added (an outlier counts as non-zero); `zero_codes`: the same without the outliers;
- `disk_mb`: the bytes of the saved weight files (*.safetensors), in MiB; `linears_mb`: the part of them that the
  quantized Linears' tensors take (codes, scales, offsets, outliers); `outliers`: how many outliers were kept.

llm-compressor's cases (bench_llmcompressor.py, SparseGPTModifier + RTN QuantizationModifier, run through its own
venv when bench/out/llmc-venv exists) run after slimquant's, so both tools are measured in one run.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

W8 = {"bits": 8, "symmetric": True}  # per channel
W4_G128 = {"bits": 4, "symmetric": False, "group_size": 128}
SCHEMES = {"W8": W8, "W4 g128": W4_G128}
PATTERNS = {"50%": {"sparsity": 0.5}, "2:4": {"pattern": "2:4"}}
OUTLIERS = {"fraction": 0.01}  # sigma_factor: the plugin's default (3.0)
SIDE_BY_SIDE = "SparseGPT"  # llm-compressor's cases whose name holds this run after ours


def sparse(weights: dict, **args) -> dict:
    return {"weights": weights, "algorithms": [{"name": "sparse", **args}],
            "data_free": args.get("method") == "magnitude"}


CASES: dict[str, dict] = {}
for _pattern, _prune in PATTERNS.items():
    for _scheme, _weights in SCHEMES.items():
        CASES[f"{_pattern} {_scheme} sparsegpt"] = sparse(_weights, **_prune)
        CASES[f"{_pattern} {_scheme} sparsegpt fraction 0.01"] = sparse(_weights, **_prune, **OUTLIERS)
        CASES[f"{_pattern} {_scheme} magnitude"] = sparse(_weights, **_prune, method="magnitude")


def saved_report(model, report) -> dict:
    """Save the quantized model and read back what the files hold (not timed)."""
    from slimquant.export import save_quantized
    from slimquant_sparse import saved_sparsity

    with tempfile.TemporaryDirectory(dir=common.OUT, prefix="sparse-save-") as tmp:
        out = Path(tmp) / "out"
        with common.Timer() as t:
            save_quantized(model, out, save_type=["safe_tensor"], linear_types=report.linear_types())
        found = saved_sparsity(out)
        weights = sum(s.weights for s in found.values())
        disk = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        return {
            "sparsity": round(sum(s.zero_weights * s.weights for s in found.values()) / weights, 5),
            "zero_codes": round(sum(s.zero_codes * s.weights for s in found.values()) / weights, 5),
            "outliers": sum(s.outliers for s in found.values()),
            "quantized_linears": len(found),
            "disk_mb": round(disk / 2**20, 2),
            "linears_mb": round(sum(s.stored_bytes for s in found.values()) / 2**20, 2),
            "save_seconds": round(t.seconds, 1),
        }


def case(name: str) -> dict:
    """One case in this process: load fp32, quantize (timed, peak RSS), perplexity, then save and read back."""
    import slimquant

    recipe = dict(CASES[name])
    data_free = recipe.pop("data_free", False)
    model, tokenizer = common.load_fp32()
    result = {"case": name, "model_mb": round(common.model_mb(model), 1),
              "rss_after_load_mb": round(common.current_rss_mb(), 1)}
    samples = None if data_free else common.calib_samples(tokenizer)
    common.release_free_memory()
    common.reset_peak_rss()
    result["rss_before_quant_mb"] = round(common.current_rss_mb(), 1)
    with common.Timer() as t:
        report = slimquant.quantize(model, {**recipe, "runtime": {"progress": False}}, samples=samples)
    result.update(quant_seconds=round(t.seconds, 1), peak_rss_quant_mb=round(common.peak_rss_mb(), 1))
    result["ppl"] = round(common.perplexity(model, common.eval_tokens(tokenizer)), 3)
    result.update(saved_report(model, report))
    return result


def print_summary(results: list[dict], fp32: float = 20.82) -> None:
    print("\n| case | perplexity | sparsity (zero weights) | zero codes | outliers | disk (MiB) | quantized Linears "
          "(MiB) |\n| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            continue
        print(f"| {r['case']} | {r['ppl']:.2f} | {r.get('sparsity', '-')} | {r.get('zero_codes', '-')} "
              f"| {r.get('outliers', '-')} | {r.get('disk_mb', '-')} | {r.get('linears_mb', '-')} |")
    ppl = {r["case"]: r["ppl"] for r in results if "ppl" in r}
    if "50% W8 sparsegpt" in ppl and "50% W8 magnitude" in ppl:
        ours, magnitude = ppl["50% W8 sparsegpt"] - fp32, ppl["50% W8 magnitude"] - fp32
        verdict = "met" if ours <= magnitude / 2 else "NOT met"
        print(f"\nTarget (SparseGPT 50% W8 loses at most half of magnitude 50% W8's loss over fp32 {fp32}): {verdict}, "
              f"{ours:.2f} against {magnitude:.2f} ({100 * ours / magnitude:.1f}%)")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="run only these cases (slimquant's or llm-compressor's)")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(case(args.case)))
        return
    external = [n for n in common.llmcompressor_cases() if SIDE_BY_SIDE in n]
    if args.list:
        print("\n".join(list(CASES) + external))
        return
    unknown = [n for n in args.only or [] if n not in CASES and n not in external]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; cases: {list(CASES) + external}")
    results = common.run_cases(Path(__file__), args.only or list(CASES) + external, "sparse_results.json")
    print_summary(results)


if __name__ == "__main__":
    main()
