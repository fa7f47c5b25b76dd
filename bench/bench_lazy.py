"""Lazy loading: peak memory while quantizing checkpoints of 12, 24 and 48 decoder layers, and bit-identity.

1. Synthetic Llama checkpoints (random weights, hidden 1024, intermediate 2816, 16 heads / 4 KV heads, vocab 32000,
   untied head; fp32 safetensors in 1 GB shards) are written under bench/out/lazy/.
2. Each case runs in its own process: the libraries are imported and warmed up, VmRSS is read (the baseline), the
   peak is reset, then the checkpoint is quantized with `slimquant.lazy.quantize_checkpoint` (W4A16 g128 GPTQ, or
   W8A8 with SmoothQuant) on --samples x 512 random tokens, written to disk as it goes. Peak RSS above the
   baseline is reported beside the checkpoint's size. `eager ...` cases load the whole model and save it after.
3. `smollm2 ...`: SmolLM2-135M fp32 (bench/out/smollm2-135m-fp32) quantized GPTQ W4A16 g64 on 32 x 512 tokens of
   wiki.valid.tokens, in memory then saved, and lazily; the sha256 of every output file is compared.

    python bench/bench_lazy.py [--layers 12 24 48] [--samples 16] [--only CASE ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from common import (
    OUT,
    _merge_results,
    current_rss_mb,
    ensure_fp32_cache,
    peak_rss_mb,
    release_free_memory,
    reset_peak_rss,
    run_isolated,
)

WORK = OUT / "lazy"
SEQLEN = 512
GPTQ = {"scheme": "W4A16", "weights": {"bits": 4, "group_size": 128, "symmetric": True}, "algorithms": ["gptq"]}
W8A8_SQ = {"scheme": "W8A8", "algorithms": ["smoothquant", "minmax"]}
SMOLLM2_GPTQ = {"scheme": "W4A16", "weights": {"bits": 4, "group_size": 64, "symmetric": False},
                "algorithms": ["gptq"]}
RECIPES = {"gptq": GPTQ, "w8a8-sq": W8A8_SQ}


def checkpoint_dir(layers: int) -> Path:
    return WORK / f"llama-{layers}L"


def make_checkpoint(layers: int) -> Path:
    import torch
    import transformers

    path = checkpoint_dir(layers)
    if (path / "config.json").exists():
        return path
    config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                                      num_key_value_heads=4, num_hidden_layers=layers, vocab_size=32000,
                                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="1GB")
    tmp.rename(path)
    return path


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def random_samples(count: int, vocab: int = 32000):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, SEQLEN), generator=g) for _ in range(count)]


def smollm2_samples():
    from common import calib_samples

    from slimquant.config.recipe import ModelSpec
    from slimquant.model.loading import load_tokenizer

    return calib_samples(load_tokenizer(ModelSpec(path=str(ensure_fp32_cache()))))


def warm_up() -> None:
    """Import and exercise what every case uses, so the baseline holds the libraries and nothing of the model."""
    import torch
    import transformers  # noqa: F401

    import slimquant  # noqa: F401
    from slimquant.lazy import quantize_checkpoint  # noqa: F401

    torch.randn(64, 64) @ torch.randn(64, 64)


def run_case(case: str, samples: int) -> dict:
    kind, recipe_name, layers = case.split()
    source = ensure_fp32_cache() if layers == "smollm2" else checkpoint_dir(int(layers))
    recipe = {**(SMOLLM2_GPTQ if layers == "smollm2" else RECIPES[recipe_name]),
              "model": {"path": str(source), "lazy": kind == "lazy"}, "runtime": {"progress": False}}
    data = smollm2_samples() if layers == "smollm2" else random_samples(samples)
    output = WORK / "outputs" / case.replace(" ", "-")
    shutil.rmtree(output, ignore_errors=True)
    warm_up()
    release_free_memory()
    baseline = current_rss_mb()
    reset_peak_rss()
    started = time.perf_counter()
    if kind == "lazy":
        from slimquant.lazy import quantize_checkpoint

        quantize_checkpoint(recipe, output, samples=data)
    else:
        import slimquant
        from slimquant.config.recipe import ModelSpec
        from slimquant.export import save_quantized
        from slimquant.model.loading import load_model

        model = load_model(ModelSpec(path=str(source)))
        report = slimquant.quantize(model, recipe, samples=data)
        save_quantized(model, output, linear_types=report.linear_types())
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    return {"case": case, "seconds": round(seconds, 1), "baseline_rss_mb": round(baseline, 1),
            "peak_rss_mb": round(peak, 1), "above_baseline_mb": round(peak - baseline, 1),
            "checkpoint_mb": round(folder_mb(source), 1), "output_mb": round(folder_mb(output), 1)}


def sha256_of(folder: Path) -> dict[str, str]:
    from slimquant.export.names import sha256_file

    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, nargs="*", default=[12, 24, 48])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--eager", type=int, nargs="*", default=[12], help="layer counts also run in memory")
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.samples)))
        return
    cases = ["eager gptq smollm2", "lazy gptq smollm2"]
    for recipe in RECIPES:
        cases += [f"lazy {recipe} {n}" for n in args.layers]
        cases += [f"eager {recipe} {n}" for n in args.eager]
    if args.only:
        cases = [c for c in cases if c in args.only]
    for n in {int(c.split()[2]) for c in cases if not c.endswith("smollm2")}:
        make_checkpoint(n)
    results = []
    for case in cases:
        results.append(run_isolated(Path(__file__), case, ["--samples", str(args.samples)]))
        print(json.dumps(results[-1]), flush=True)
        _merge_results(OUT / "bench_lazy.json", results)  # a run cut short keeps what it measured
    if {"eager gptq smollm2", "lazy gptq smollm2"} <= set(cases):
        eager, lazy = (sha256_of(WORK / "outputs" / f"{k}-gptq-smollm2") for k in ("eager", "lazy"))
        same = eager == lazy
        print(f"SmolLM2 outputs: {len(eager)} files, {'all byte-identical' if same else 'DIFFER'}: "
              + ", ".join(f"{name} {digest[:12]}" for name, digest in eager.items()))
    print("\n| case | time (s) | baseline RSS (MB) | peak RSS (MB) | peak above baseline (MB) | checkpoint (MB) "
          "| output (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['case']} | failed: {r['error']} | | | | | |")
            continue
        print(f"| {r['case']} | {r['seconds']} | {r['baseline_rss_mb']} | {r['peak_rss_mb']} "
              f"| **{r['above_baseline_mb']}** | {r['checkpoint_mb']} | {r['output_mb']} |")


if __name__ == "__main__":
    main()
