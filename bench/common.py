"""Shared benchmark protocol: SmolLM2-135M fp32, WikiText-2 test perplexity (16 windows of 2048 tokens),
calibration 32 x 512 tokens drawn from wiki.valid.tokens with a fixed seed.

The fp32 model is dequantized from the package's GGUF once and cached as safetensors under bench/out/,
so every run loads the same weights quickly and its peak RSS is not inflated by the GGUF dequantizer.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
DATA = Path(os.environ.get("SLIMQUANT_DATA", ROOT.parent.parent / "shared" / "data" / "wikitext2"))
CACHE = OUT / "smollm2-135m-fp32"

EVAL_WINDOW = 2048
EVAL_WINDOWS = 16
CALIB_SAMPLES = 32
CALIB_SEQLEN = 512
CALIB_SEED = 0


def ensure_fp32_cache() -> Path:
    if (CACHE / "config.json").exists():
        return CACHE
    from slimquant.config.recipe import ModelSpec
    from slimquant.model.loading import load_model, load_tokenizer

    model = load_model(ModelSpec())
    tokenizer = load_tokenizer(ModelSpec())
    from safetensors.torch import save_file

    from slimquant.model.structure import tied_parameter_names

    tmp = CACHE.with_name(CACHE.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tied = tied_parameter_names(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the GGUF marker: these weights are plain fp32 now
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(CACHE)
    return CACHE


def load_fp32():
    """The fp32 model in ordinary memory, as a model built or fine-tuned in this process would be.

    from_pretrained would map the file, and its pages would count in RSS for as long as the mapping lives; here
    each tensor is copied out of a mapping that is closed before quantization starts."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = ensure_fp32_cache()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32).eval()
    state = model.state_dict()
    with torch.no_grad(), safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            state[key].copy_(f.get_tensor(key))
    model.tie_weights()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def eval_tokens(tokenizer) -> torch.Tensor:
    text = (DATA / "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]


def calib_samples(tokenizer, count: int = CALIB_SAMPLES, seqlen: int = CALIB_SEQLEN, seed: int = CALIB_SEED):
    """The calibration windows, tokenized once and cached: tokenizing the whole file in every case would add
    ~130 MB of tokenizer memory to the RSS measured around quantization."""
    from safetensors.torch import load_file, save_file

    cache = OUT / f"calib-wiki-valid-{count}x{seqlen}-seed{seed}.safetensors"
    if not cache.exists():
        from slimquant.calibration import random_windows

        text = (DATA / "wiki.valid.tokens").read_text(encoding="utf-8")
        windows = random_windows(text, tokenizer, count, seqlen, seed, where="wiki.valid.tokens")
        tmp = cache.with_suffix(".tmp")
        save_file({"ids": torch.cat(windows)}, str(tmp))
        tmp.rename(cache)
    return [row[None] for row in load_file(str(cache))["ids"]]


def perplexity(model, tokens) -> float:
    from slimquant.eval.perplexity import perplexity as ppl

    return ppl(model, tokens, EVAL_WINDOW, EVAL_WINDOWS, progress=False)


def release_free_memory() -> None:
    """Hand freed heap back to the OS, so RSS before quantization is what the process really holds."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak_rss() -> None:
    """Start peak-RSS accounting afresh (Linux: VmHWM is reset by writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    """Peak RSS since the last reset_peak_rss()."""
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def current_rss_mb() -> float:
    return _status_mb("VmRSS")


def model_mb(model) -> float:
    seen, total = set(), 0
    for p in list(model.parameters()) + list(model.buffers()):
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total / 2**20


LLMC_PYTHON = OUT / "llmc-venv" / "bin" / "python"
LLMC_SCRIPT = ROOT / "bench_llmcompressor.py"


def llmcompressor_cases() -> list[str]:
    """llm-compressor's cases, when its environment (see bench_llmcompressor.py) is installed."""
    if not LLMC_PYTHON.exists():
        return []
    proc = subprocess.run([str(LLMC_PYTHON), str(LLMC_SCRIPT), "--list"], capture_output=True, text=True)
    return proc.stdout.split("\n")[:-1] if proc.returncode == 0 else []


def run_isolated(script: Path, case: str, extra: list[str] = (), python: str = sys.executable) -> dict:
    """Run one case in a fresh process so its peak RSS is its own; the case prints one JSON line last."""
    if case.startswith("llm-compressor "):
        script, python = LLMC_SCRIPT, str(LLMC_PYTHON)
    proc = subprocess.run([python, str(script), "--case", case, *extra], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"case": case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def quantize_and_measure(name: str, recipe: dict | None, samples_fn=None) -> dict:
    """One benchmark case in this process: load fp32, quantize (timed, peak RSS), perplexity."""
    import slimquant

    model, tokenizer = load_fp32()
    result = {"case": name, "model_mb": round(model_mb(model), 1), "rss_after_load_mb": round(current_rss_mb(), 1)}
    if recipe is not None:
        data_free = recipe.get("data_free", False)  # no samples: the runtime's data-free path
        recipe = {k: v for k, v in recipe.items() if k != "data_free"}
        samples = None if data_free else (samples_fn or calib_samples)(tokenizer)
        release_free_memory()
        reset_peak_rss()
        result["rss_before_quant_mb"] = round(current_rss_mb(), 1)
        with Timer() as t:
            runtime = {"progress": False, **recipe.get("runtime", {})}
            slimquant.quantize(model, {**recipe, "runtime": runtime}, samples=samples)
        result.update(quant_seconds=round(t.seconds, 1), peak_rss_quant_mb=round(peak_rss_mb(), 1))
    result["ppl"] = round(perplexity(model, eval_tokens(tokenizer)), 3)
    return result


def run_cases(script: Path, names: list[str], json_name: str, fp32_ppl: float = 20.82,
              extra: list[str] = ()) -> list[dict]:
    """Run each case in its own process (`extra`: more arguments for it), print a Markdown table, keep the results
    as JSON under bench/out/."""
    ensure_fp32_cache()
    results = []
    for name in names:
        results.append(run_isolated(script, name, extra))
        print(json.dumps(results[-1]), flush=True)
        _merge_results(OUT / json_name, results)  # a run cut short keeps what it measured
    fp32 = next((r["ppl"] for r in results if r["case"] == "fp32" and "ppl" in r), fp32_ppl)
    print("\n| case | perplexity | vs fp32 | quant time (s) | peak RSS (MB) | RSS before quant (MB) "
          "| peak / fp32 model |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['case']} | failed: {r['error']} | | | | | |")
            continue
        peak = r.get("peak_rss_quant_mb")
        ratio = f"{peak / r['model_mb']:.2f}" if peak else "-"
        print(f"| {r['case']} | {r['ppl']:.2f} | {100 * (r['ppl'] / fp32 - 1):+.2f}% | {r.get('quant_seconds', '-')} "
              f"| {peak or '-'} | {r.get('rss_before_quant_mb', '-')} | {ratio} |")
    return results


def _merge_results(path: Path, results: list[dict]) -> None:
    """Earlier results of other cases are kept; a case run again replaces its old result."""
    path.parent.mkdir(exist_ok=True)
    earlier = [r for r in (json.loads(path.read_text()) if path.exists() else [])
               if r["case"] not in {n["case"] for n in results}]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(earlier + results, indent=1))
    tmp.replace(path)


def case_main(script: Path, cases: dict, json_name: str, side_by_side: str = "") -> None:
    """CLI of a bench script; llm-compressor's cases whose name contains `side_by_side` run after slimquant's."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="run only these cases")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(quantize_and_measure(args.case, cases[args.case])))
        return
    external = [n for n in llmcompressor_cases() if side_by_side and side_by_side in n]
    unknown = [n for n in args.only or [] if n not in cases and n not in external]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; cases: {list(cases) + external}")
    run_cases(script, args.only or list(cases) + external, json_name)
