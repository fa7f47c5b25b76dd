"""What the torch-based engine scripts share: their command line (MODEL_DIR WINDOWS.safetensors [--dtype]), the
saved token windows, and the one JSON line they print (exp(mean NLL) over tokens 2..N of each window, as
slimquant.eval.perplexity computes it)."""

from __future__ import annotations

import argparse
import json
import math
import time


def parse_args():
    """(args, windows): the command line and the [windows, tokens] id tensor bench_export.py saved."""
    from safetensors.torch import load_file

    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("windows")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    return args, load_file(args.windows)["ids"]


def print_result(engine: str, dtype: str, nll: float, count: int, started: float) -> None:
    print(json.dumps({"engine": engine, "dtype": dtype, "ppl": round(math.exp(nll / count), 3), "tokens": count,
                      "seconds": round(time.perf_counter() - started, 1)}))
