"""Perplexity of a Hugging Face model folder as transformers loads it (`AutoModelForCausalLM.from_pretrained`, with
whatever quantizer its config names: compressed-tensors, GPTQ through optimum + GPTQModel), on token windows saved
by bench_export.py; slimquant is not imported, so it runs in an engine's own environment too.

    python bench/engines/transformers_perplexity.py MODEL_DIR WINDOWS.safetensors [--dtype float32]

exp(mean NLL) over tokens 2..N of each window, as slimquant.eval.perplexity computes it. Prints one JSON line.
"""

from __future__ import annotations

import time

import torch
from windows_cli import parse_args, print_result


@torch.no_grad()
def main() -> None:
    args, windows = parse_args()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype)).eval()
    start = time.perf_counter()
    nll, count = 0.0, 0
    for row in windows:
        logits = model(input_ids=row[None], use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
        count += row.numel() - 1
    print_result("transformers", args.dtype, nll, count, start)


if __name__ == "__main__":
    main()
