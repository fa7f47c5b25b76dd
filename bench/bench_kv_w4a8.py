"""KV cache int8 and W4A8 dynamic (issue 16) on SmolLM2-135M, WikiText-2 perplexity (bench/common.py protocol), each
with a save -> load round trip.

    python bench/bench_kv_w4a8.py                       # the main cases, each in its own process
    python bench/bench_kv_w4a8.py --only "W4A16 g64 GPTQ" "W4A8 dynamic g64 GPTQ"
    python bench/bench_kv_w4a8.py --extra               # the main cases, then the decomposition cases (EXTRA)
    python bench/bench_kv_w4a8.py --list
    python bench/bench_kv_w4a8.py --windows 4 --only "msModelSlim W8A8 dynamic" \
        "msModelSlim W8A8 dynamic + kv int8 per-head" "msModelSlim W8A8 dynamic + kv int8 per-channel"

Targets: KV int8 on top of W8A8 static + SmoothQuant a0.5 (bench_smooth.py's 22.95 row, recipe imported from there)
changes perplexity by at most +1%; W4A8 dynamic g64 with gptq is at most 1.05x W4A16 g64 GPTQ (both with the gptq
plugin's defaults; W4A16 asymmetric as in bench_gptq.py / bench_contract.py, W4A8 symmetric int4 groups on
msModelSlim's per-channel int8 level, `channel_bits: 8`, with per-token dynamic int8 activations).

The msModelSlim cases (issue 31) are `QuantConfig(w_bit=8, a_bit=8, is_dynamic=True)`'s recipe without a cache, with
the native per-head cache, and with `use_kvcache_quant=True`'s per-channel cache: per channel should not lose to per
head.

Each case: load fp32, quantize (timed, peak RSS), perplexity on 16 x 2048 tokens (common.quantize_and_measure); then
the round trip: `save_quantized` with its defaults (msModelSlim / Ascend safetensors layout, int4 packed) into a
temporary folder, `load_quantized` into a fresh fp32 model, and the logits of the first evaluation window compared
with the in-memory quantized model's (max abs diff; identical = torch.equal). Results:
bench/out/kv_w4a8_results.json; the summary at the end reads that file, so separate --only runs combine.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

from slimquant.compat.msmodelslim import QuantConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_smooth  # noqa: E402
import common  # noqa: E402

JSON_NAME = "kv_w4a8_results.json"
BASE = "W8A8 static + smoothquant a0.5"
SMOOTH = copy.deepcopy(bench_smooth.CASES["W8A8 static am2 | smoothquant a0.5"])  # RESULTS.md: 22.95
KV = {  # the kv_cache section; `{"bits": 8}` alone is the kvcache plugin's default (static, per kv head, asymmetric)
    "kv int8": {"bits": 8},
    "kv int8 per-tensor": {"bits": 8, "strategy": "tensor"},
    "kv int8 per-token dynamic": {"bits": 8, "strategy": "token", "dynamic": True},
}
MSMODELSLIM = "msModelSlim W8A8 dynamic"
MSMODELSLIM_KV = {"kv int8 per-head": {"bits": 8}, "kv int8 per-channel": None}  # None: use_kvcache_quant's own
W4A16_G64 = "W4A16 g64 GPTQ"
W4A8_G64 = "W4A8 dynamic g64 GPTQ"
G64 = {"bits": 4, "group_size": 64, "symmetric": False}
G64_TWO_LEVEL = {"bits": 4, "group_size": 64, "symmetric": True, "channel_bits": 8}  # W4A8_DYNAMIC's default too

CASES: dict[str, dict] = {
    BASE: SMOOTH,
    **{f"{BASE} + {name}": {**SMOOTH, "kv_cache": kv} for name, kv in KV.items()},
    W4A16_G64: {"weights": G64, "algorithms": ["gptq"]},
    W4A8_G64: {"scheme": "W4A8_DYNAMIC", "weights": G64_TWO_LEVEL, "algorithms": ["gptq"]},
}
EXTRA: dict[str, dict] = {  # where W4A8's distance to W4A16 comes from: symmetric codes, the int8 level, activations
    "W4A16 g64 GPTQ symmetric": {"weights": {**G64, "symmetric": True}, "algorithms": ["gptq"]},
    "W4A16 g64 GPTQ two-level (W4A8's weights, float activations)": {"weights": G64_TWO_LEVEL,
                                                                     "algorithms": ["gptq"]},
    "W4A8 dynamic g64 RTN": {"scheme": "W4A8_DYNAMIC", "weights": G64_TWO_LEVEL, "algorithms": ["minmax"]},
    **{f"W4A8 dynamic g64 smoothquant a{a} + GPTQ": {
        "scheme": "W4A8_DYNAMIC", "weights": G64_TWO_LEVEL,
        "algorithms": [{"name": "smoothquant", "alpha": a, "smooth_all_linears": True}, "gptq"]} for a in (0.3, 0.5)},
}


def msmodelslim_recipe(kv_cache: dict | None = None, use_kvcache_quant: bool = False) -> dict:
    """QuantConfig(w_bit=8, a_bit=8, is_dynamic=True, use_kvcache_quant=...)'s recipe; `kv_cache` replaces its
    cache section when given."""
    config = QuantConfig(w_bit=8, a_bit=8, is_dynamic=True, use_kvcache_quant=use_kvcache_quant)
    recipe = config.to_recipe().model_dump(mode="json", exclude_defaults=True)
    return recipe if kv_cache is None else {**recipe, "kv_cache": kv_cache}


MSMODELSLIM_CASES: dict[str, dict] = {
    MSMODELSLIM: msmodelslim_recipe(),
    **{f"{MSMODELSLIM} + {name}": msmodelslim_recipe(kv, use_kvcache_quant=kv is None)
       for name, kv in MSMODELSLIM_KV.items()},
}
ALL = {**CASES, **EXTRA, **MSMODELSLIM_CASES}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits[0].float()


def round_trip(model, ids: torch.Tensor) -> dict:
    """Save `model` with save_quantized's defaults, load it into a fresh fp32 model, compare logits on `ids`."""
    from slimquant.export import save_quantized
    from slimquant.loader import load_quantized

    expected = logits(model, ids)
    with tempfile.TemporaryDirectory(prefix="slimquant-roundtrip-") as tmp:
        out = Path(tmp) / "out"
        with common.Timer() as save:
            files = save_quantized(model, out)
        desc = json.loads(next(out.glob("quant_model_description*.json")).read_text())
        fresh, _ = common.load_fp32()
        with common.Timer() as load:
            reloaded = load_quantized(fresh, out)
        got = logits(reloaded, ids)
        saved_mb = sum(f.stat().st_size for f in files if f.suffix == ".safetensors") / 2**20
    del reloaded, fresh
    return {"saved_type": desc.get("model_quant_type"), "kv_cache_type": desc.get("kv_cache_type"),
            "saved_mb": round(saved_mb, 1), "save_seconds": round(save.seconds, 1),
            "load_seconds": round(load.seconds, 1), "roundtrip_tokens": ids.shape[1],
            "roundtrip_max_abs_diff": float((got - expected).abs().max()),
            "roundtrip_identical": bool(torch.equal(got, expected))}


def measure(name: str) -> dict:
    """common.quantize_and_measure, then the round trip on the quantized model and the first evaluation window
    (both caught as they go through common.perplexity)."""
    caught = {}
    ppl = common.perplexity

    def catching(model, tokens):
        caught.update(model=model, tokens=tokens)
        return ppl(model, tokens)

    common.perplexity = catching
    result = common.quantize_and_measure(name, copy.deepcopy(ALL[name]))
    common.perplexity = ppl
    result.update(round_trip(caught["model"], caught["tokens"][:common.EVAL_WINDOW][None]))
    result["eval_windows"] = common.EVAL_WINDOWS
    return result


def summary(results: list[dict]) -> None:
    by_case = {r["case"]: r for r in results if "ppl" in r}
    print("\n| case | saved as | kv cache | safetensors MB | max abs logit diff after reload | identical |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "roundtrip_identical" in r:
            print(f"| {r['case']} | {r['saved_type']} | {r['kv_cache_type'] or '-'} | {r['saved_mb']} "
                  f"| {r['roundtrip_max_abs_diff']:.3g} | {'yes' if r['roundtrip_identical'] else 'NO'} |")
    print()
    base = by_case.get(BASE)
    for name in KV:
        kv = by_case.get(f"{BASE} + {name}")
        if base and kv:
            change = 100 * (kv["ppl"] / base["ppl"] - 1)
            print(f"{name}: {base['ppl']:.3f} -> {kv['ppl']:.3f}, {change:+.2f}% (target <= +1%: "
                  f"{'met' if change <= 1 else 'NOT met'})")
    msmodelslim = by_case.get(MSMODELSLIM)
    for name in MSMODELSLIM_KV:
        kv = by_case.get(f"{MSMODELSLIM} + {name}")
        if msmodelslim and kv:
            print(f"msModelSlim {name}: {msmodelslim['ppl']:.3f} -> {kv['ppl']:.3f}, "
                  f"{100 * (kv['ppl'] / msmodelslim['ppl'] - 1):+.2f}% ({kv.get('eval_windows', 16)} windows)")
    w4a16, w4a8 = by_case.get(W4A16_G64), by_case.get(W4A8_G64)
    if w4a16 and w4a8:
        ratio = w4a8["ppl"] / w4a16["ppl"]
        print(f"W4A8 / W4A16 g64 GPTQ: {w4a8['ppl']:.3f} / {w4a16['ppl']:.3f} = {ratio:.4f}x (target <= 1.05x: "
              f"{'met' if ratio <= 1.05 else 'NOT met'})")
    failed = [r["case"] for r in results if r.get("roundtrip_identical") is False]
    print("round trip: " + (f"logits differ for {failed}" if failed else "identical logits for every case measured"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="run only these cases (see --list)")
    parser.add_argument("--extra", action="store_true", help="run the decomposition cases after the main ones")
    parser.add_argument("--list", action="store_true", help="print the case names")
    parser.add_argument("--windows", type=int, help=f"evaluation windows (default {common.EVAL_WINDOWS})")
    args = parser.parse_args()
    if args.windows:
        common.EVAL_WINDOWS = args.windows
    if args.list:
        print("\n".join(ALL))
        return
    if args.case:
        print(json.dumps(measure(args.case)))
        return
    names = args.only or list(CASES) + (list(EXTRA) if args.extra else [])
    unknown = [n for n in names if n not in ALL]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; cases: {list(ALL)}")
    common.run_cases(Path(__file__), names, JSON_NAME,
                     extra=["--windows", str(args.windows)] if args.windows else [])
    summary(json.loads((common.OUT / JSON_NAME).read_text()))


if __name__ == "__main__":
    main()
