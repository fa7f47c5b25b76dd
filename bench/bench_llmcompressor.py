"""llm-compressor on the same model, data and protocol, for the side-by-side rows of bench/RESULTS.md.

llm-compressor pins transformers <= 5.17, so it lives in its own environment next to slimquant's:

    python3 -m venv bench/out/llmc-venv && . bench/out/llmc-venv/bin/activate
    pip install -c constraints.txt torch==2.13.0 llmcompressor==0.14.0.1 gguf
    pip install --no-deps -e core && pip install pluggy typer rich
    python bench/bench_llmcompressor.py [--only CASE ...]

Calibration is the very token windows slimquant gets (bench/common.py), 32 x 512 from wiki.valid.tokens.
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
}


def run_case(name: str) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    method, group = CASES[name]
    model, tokenizer = common.load_fp32()
    result = {"case": name, "model_mb": round(common.model_mb(model), 1),
              "rss_after_load_mb": round(common.current_rss_mb(), 1)}
    samples = common.calib_samples(tokenizer)
    data = Dataset.from_dict({"input_ids": [s[0].tolist() for s in samples],
                              "attention_mask": [[1] * s.shape[1] for s in samples]})
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=False, strategy="group", group_size=group))
    if method == "gptq":
        modifier = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], block_size=128,
                                dampening_frac=0.01)
    else:
        modifier = QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    with common.Timer() as t:
        oneshot(model=model, dataset=data, recipe=modifier, max_seq_length=common.CALIB_SEQLEN,
                num_calibration_samples=len(samples))
    result.update(quant_seconds=round(t.seconds, 1), peak_rss_quant_mb=round(common.peak_rss_mb(), 1))
    result["ppl"] = round(common.perplexity(model, common.eval_tokens(tokenizer)), 3)
    return result


if __name__ == "__main__":
    if "--case" in sys.argv:
        print(json.dumps(run_case(sys.argv[sys.argv.index("--case") + 1])))
    else:
        only = sys.argv[sys.argv.index("--only") + 1:] if "--only" in sys.argv else list(CASES)
        common.run_cases(Path(__file__), only, "llmcompressor_results.json")
