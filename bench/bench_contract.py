"""Contract v2 benchmark (issue 12): the data-free path and batched calibration, side by side in one run.

    python bench/bench_contract.py [--only CASE ...]

Cases (each in a fresh process, bench/common.py protocol: SmolLM2-135M fp32, WikiText-2 test 16 x 2048, calibration
32 x 512 from wiki.valid.tokens):
- "transformers load": AutoModelForCausalLM.from_pretrained of the fp32 safetensors (the yardstick for data-free
  quantization time), and of the package's GGUF file;
- RTN W8A16 / W4A16 g128, data-free (no samples) and calibrated (samples given: errors against float measured);
- GPTQ W4A16 g64 with the plugin's defaults (act_order, mse, true_sequential off; calibration passes in bfloat16 on
  a CPU with AVX512-BF16), with the passes in the model's float32, with true_sequential on, and with one sample per
  forward (batch_tokens 512, the old unbatched passes);
- llm-compressor's GPTQ W4A16 g64 (its own venv, see bench_llmcompressor.py), when installed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

G64 = {"bits": 4, "symmetric": False, "group_size": 64}
G128 = {"bits": 4, "symmetric": False, "group_size": 128}
CASES: dict[str, dict | None] = {
    "W8A16 RTN data-free": {"scheme": "W8A16", "data_free": True},
    "W4A16 g128 RTN data-free": {"weights": G128, "data_free": True},
    "W8A16 RTN calibrated": {"scheme": "W8A16"},
    "W4A16 g128 RTN calibrated": {"weights": G128},
    "W4A16 g64 GPTQ defaults": {"weights": G64, "algorithms": ["gptq"]},
    "W4A16 g64 GPTQ passes in float32": {"weights": G64, "algorithms": ["gptq"],
                                          "runtime": {"calibration_dtype": "model"}},
    "W4A16 g64 GPTQ true_sequential on": {"weights": G64, "algorithms": [{"name": "gptq", "true_sequential": True}]},
    "W4A16 g64 GPTQ defaults unbatched": {"weights": G64, "algorithms": ["gptq"], "runtime": {"batch_tokens": 512}},
}
LOAD_CASE = "transformers load"


def measure_load() -> dict:
    from transformers import AutoModelForCausalLM

    from slimquant.model.loading import embedded_model_file

    path = common.ensure_fp32_cache()
    started = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    safetensors_s = time.perf_counter() - started
    gguf = embedded_model_file()
    started = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    return {"case": LOAD_CASE, "load_safetensors_seconds": round(safetensors_s, 2),
            "load_gguf_seconds": round(time.perf_counter() - started, 2)}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="run only these cases")
    args = parser.parse_args()
    if args.case == LOAD_CASE:
        print(json.dumps(measure_load()))
        return
    if args.case:
        print(json.dumps(common.quantize_and_measure(args.case, CASES[args.case])))
        return
    external = [n for n in common.llmcompressor_cases() if n == "llm-compressor GPTQ W4A16 g64"]
    names = args.only or [LOAD_CASE, *CASES, *external]
    common.ensure_fp32_cache()
    results = []
    for name in names:
        results.append(common.run_isolated(Path(__file__), name))
        print(json.dumps(results[-1]), flush=True)
        common._merge_results(common.OUT / "contract_results.json", results)


if __name__ == "__main__":
    main()
