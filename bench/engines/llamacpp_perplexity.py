"""llama.cpp's side of bench_export.py, in its own environment (bench/out/llamacpp-venv, see bench_export.py):
perplexity of a GGUF file as llama.cpp computes the logits, and llama.cpp's own quantizer.

    python bench/engines/llamacpp_perplexity.py ppl MODEL.gguf WINDOWS.safetensors
    python bench/engines/llamacpp_perplexity.py quantize F32.gguf OUT.gguf Q4_0|Q4_K_M|...[+f32emb]

The windows are token ids (the ones slimquant's perplexity uses), fed without a BOS token as slimquant feeds
them; the NLL of tokens 2..N of each window comes from llama.cpp's logits. Prints one JSON line.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np


def perplexity(model_path: str, windows_path: str) -> dict:
    from llama_cpp import Llama
    from safetensors.numpy import load_file

    windows = load_file(windows_path)["ids"]
    n = windows.shape[1]
    llm = Llama(model_path=model_path, n_ctx=n, n_batch=n, n_ubatch=512, logits_all=True, verbose=False,
                n_threads=os.cpu_count(), seed=0)
    start = time.perf_counter()
    nll, count = 0.0, 0
    for row in windows:
        llm.reset()
        llm.eval(row.tolist())
        logits = np.asarray(llm.scores[: n - 1], dtype=np.float64)
        peak = logits.max(axis=1, keepdims=True)
        logsumexp = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
        nll += float((logsumexp - logits[np.arange(n - 1), row[1:]]).sum())
        count += n - 1
    return {"engine": "llama.cpp", "ppl": round(math.exp(nll / count), 3), "tokens": count,
            "seconds": round(time.perf_counter() - start, 1)}


def quantize(source: str, target: str, kind: str) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    kind, _, keep = kind.partition("+")
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    if keep == "f32emb":  # token embedding (and the tied output) left in F32, as slimquant leaves them
        params.token_embedding_type = params.output_tensor_type = 0  # GGML_TYPE_F32
    params.nthread = os.cpu_count()
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(source.encode(), target.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")
    return {"engine": "llama.cpp", "quantized": kind, "embeddings": keep or "quantized",
            "bytes": os.path.getsize(target),
            "seconds": round(time.perf_counter() - start, 1)}


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    print(json.dumps(perplexity(*rest) if command == "ppl" else quantize(*rest)))
