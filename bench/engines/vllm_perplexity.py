"""Perplexity of a Hugging Face model folder as vLLM runs it, on token windows saved by bench_export.py.

Runs in vLLM's own environment (bench/out/vllm-venv, see bench_export.py); slimquant is not imported.

    python bench/engines/vllm_perplexity.py MODEL_DIR WINDOWS.safetensors [--dtype float32]

Each window is one prompt; vLLM returns every prompt token's log-probability (prompt_logprobs), and the perplexity
is exp(mean NLL) over tokens 2..N of each window, as slimquant.eval.perplexity computes it. Prints one JSON line.
"""

from __future__ import annotations

import os
import time

from windows_cli import parse_args, print_result

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def main() -> None:
    args, windows = parse_args()
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model_dir, dtype=args.dtype, max_model_len=windows.shape[1] + 1, enforce_eager=True,
              seed=0, max_num_seqs=1)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": row.tolist()} for row in windows], params, use_tqdm=False)
    nll, count = 0.0, 0
    for row, out in zip(windows.tolist(), outputs, strict=True):
        for token, logprobs in zip(row[1:], out.prompt_logprobs[1:], strict=True):
            nll -= logprobs[token].logprob
            count += 1
    print_result("vllm", args.dtype, nll, count, start)


if __name__ == "__main__":
    main()
