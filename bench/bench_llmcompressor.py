"""llm-compressor on the same model, data and protocol, for the side-by-side rows of bench/RESULTS.md.

llm-compressor pins transformers <= 5.17, so it lives in its own environment next to slimquant's:

    python3 -m venv bench/out/llmc-venv && . bench/out/llmc-venv/bin/activate
    pip install torch==2.13.0 llmcompressor==0.14.0.1 gguf      # not -c constraints.txt: it pins transformers 5.24
    pip install --no-deps -e core && pip install pluggy typer rich
    python bench/bench_llmcompressor.py [--only CASE ...]

Calibration is the very token windows slimquant gets (bench/common.py), 32 x 512 from wiki.valid.tokens.
bench_gptq.py and bench_smooth.py run these cases too (through this venv's python, when it exists), so each table
holds both tools measured in one run; bench_sparse.py runs the SparseGPT cases (their result also holds
`sparsity`: the fraction of zero weights the decoder Linears compute with, fake-quantized).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CASES = {
    "llm-compressor RTN W4A16 g64": ("rtn", 64),
    "llm-compressor GPTQ W4A16 g64": ("gptq", 64),
    "llm-compressor GPTQ W4A16 g128": ("gptq", 128),
    "llm-compressor W8A8 static": ("w8a8", "static"),
    "llm-compressor SmoothQuant a0.5 + W8A8 static": ("sq+w8a8", "static"),
    "llm-compressor SmoothQuant a0.5 + GPTQ W8A8 static": ("sq+gptq", "static"),
    "llm-compressor W8A8 dynamic": ("w8a8", "dynamic"),
    "llm-compressor SmoothQuant a0.5 + W8A8 dynamic": ("sq+w8a8", "dynamic"),
    "llm-compressor AWQ W4A16 g64": ("awq", 64),
    # bench_sparse.py's side-by-side cases: SparseGPTModifier, then RTN (QuantizationModifier) onto the pruned weights
    "llm-compressor SparseGPT 50% W8": ("sparsegpt", ("0:0", "w8")),
    "llm-compressor SparseGPT 2:4 W8": ("sparsegpt", ("2:4", "w8")),
    "llm-compressor SparseGPT 50% W4 g128": ("sparsegpt", ("0:0", "w4g128")),
    "llm-compressor SparseGPT 2:4 W4 g128": ("sparsegpt", ("2:4", "w4g128")),
}


def w4_scheme(group: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=False, strategy="group", group_size=group))


def w8a8_scheme(activations: str):
    """slimquant's W8A8 presets: int8 symmetric per-channel weights; static asymmetric per-tensor or dynamic
    symmetric per-token activations."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    if activations == "static":
        acts = QuantizationArgs(num_bits=8, type="int", symmetric=False, strategy="tensor", dynamic=False)
    else:
        acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)


def w8_channel_scheme():
    """bench_sparse.py's W8: int8 symmetric per-channel weights, activations in float."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=8, type="int", symmetric=True, strategy="channel"))


def sparsegpt_recipe(mask_structure: str, weights: str):
    """SparseGPT at 50% (mask "0:0": unstructured; "2:4") on every Linear of the decoder layers (lm_head is not in
    them), block 128, dampening 0.01 (slimquant's blocksize / percdamp), then round-to-nearest quantization of the
    pruned weights (QuantizationModifier: its observers read the weights after SparseGPT has pruned them; a pruned 0
    rounds to exactly 0 at either scheme).

    W4 g128 fails on SmolLM2 at initialization, before any calibration, as GPTQ W4A16 g128 does (bench/RESULTS.md):
    llm-compressor refuses a Linear whose in_features is not a multiple of the group (576 = 4.5 x 128; "columns=576,
    group_size=128"). The case records that failure; it does not leave those Linears out with `ignore`, which would
    compare a different model."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    scheme = w8_channel_scheme() if weights == "w8" else w4_scheme(128)
    return [SparseGPTModifier(sparsity=0.5, mask_structure=mask_structure, targets=[r"re:model\.layers\.\d+$"],
                              block_size=128, dampening_frac=0.01),
            QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]


def quantized_sparsity(model) -> float:
    """The fraction of zero weights over the decoder Linears as their forward computes with them (fake-quantized
    from the pruned float weights with the stored scales and zero points)."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    zeros = total = 0
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if ".layers." not in name or scheme is None or scheme.weights is None:
            continue
        weight = forward_quantize(module, module.weight.data, "weight", scheme.weights)
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / total


def recipe(method: str, arg):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    if method == "sparsegpt":
        return sparsegpt_recipe(*arg)
    scheme = w4_scheme(arg) if isinstance(arg, int) else w8a8_scheme(arg)
    groups = {"config_groups": {"group_0": scheme}, "ignore": ["lm_head"]}
    if method == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        return [AWQModifier(**groups)]
    gptq = "gptq" in method
    quantizer = (GPTQModifier(**groups, block_size=128, dampening_frac=0.01) if gptq
                 else QuantizationModifier(**groups))
    return [SmoothQuantModifier(smoothing_strength=0.5), quantizer] if method.startswith("sq+") else [quantizer]


def run_case(name: str) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot

    model, tokenizer = common.load_fp32()
    result = {"case": name, "model_mb": round(common.model_mb(model), 1),
              "rss_after_load_mb": round(common.current_rss_mb(), 1)}
    samples = common.calib_samples(tokenizer)
    data = Dataset.from_dict({"input_ids": [s[0].tolist() for s in samples],
                              "attention_mask": [[1] * s.shape[1] for s in samples]})
    common.release_free_memory()
    common.reset_peak_rss()
    result["rss_before_quant_mb"] = round(common.current_rss_mb(), 1)
    with common.Timer() as t:
        oneshot(model=model, dataset=data, recipe=recipe(*CASES[name]), max_seq_length=common.CALIB_SEQLEN,
                num_calibration_samples=len(samples))
    result.update(quant_seconds=round(t.seconds, 1), peak_rss_quant_mb=round(common.peak_rss_mb(), 1))
    result["ppl"] = round(common.perplexity(model, common.eval_tokens(tokenizer)), 3)
    if CASES[name][0] == "sparsegpt":  # after the perplexity, not timed
        result["sparsity"] = round(quantized_sparsity(model), 5)
    return result


if __name__ == "__main__":
    if "--list" in sys.argv:
        print("\n".join(CASES))
    elif "--case" in sys.argv:
        print(json.dumps(run_case(sys.argv[sys.argv.index("--case") + 1])))
    else:
        only = sys.argv[sys.argv.index("--only") + 1:] if "--only" in sys.argv else list(CASES)
        common.run_cases(Path(__file__), only, "llmcompressor_results.json")
