"""Perplexity of a Hugging Face model folder as transformers loads it (`AutoModelForCausalLM.from_pretrained`, with
whatever quantizer its config names: compressed-tensors, GPTQ through optimum + GPTQModel), on token windows saved
by bench_export.py; slimquant is not imported, so it runs in an engine's own environment too.

    python bench/engines/transformers_perplexity.py MODEL_DIR WINDOWS.safetensors [--dtype float32]

exp(mean NLL) over tokens 2..N of each window, as slimquant.eval.perplexity computes it. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("windows")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    windows = load_file(args.windows)["ids"]
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype)).eval()
    start = time.perf_counter()
    nll, count = 0.0, 0
    for row in windows:
        logits = model(input_ids=row[None], use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
        count += row.numel() - 1
    print(json.dumps({"engine": "transformers", "dtype": args.dtype, "ppl": round(math.exp(nll / count), 3),
                      "tokens": count, "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
