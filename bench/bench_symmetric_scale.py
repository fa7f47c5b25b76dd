"""Symmetric weight scales: 'signed' (the group's weight of largest magnitude, sign kept, / -2^(bits-1); the default)
against 'absmax' (max|w| / (2^(bits-1) - 1)), round-to-nearest and GPTQ, on SmolLM2-135M, WikiText-2 perplexity.

    python bench/bench_symmetric_scale.py            # every case
    python bench/bench_symmetric_scale.py --only "W4 sym g32 RTN signed" "W4 sym g32 RTN absmax"

Each case runs in a fresh process (bench/common.py protocol); round-to-nearest runs data-free. W4 sym g32
round-to-nearest with signed scales is llama.cpp's Q4_0 rule, byte for byte (plugins/gguf_export/tests/test_gguf.py);
scales are rounded to float16 as Q4_0 stores them. "GPTQ" is gptq's defaults (act order, clipping search) with
static groups, as gguf needs; "GPTQ plain" has neither act order nor the clipping search.
Results: bench/out/symmetric_scale_results.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def weights(bits: int, group_size: int | None, rule: str) -> dict:
    return {"bits": bits, "symmetric": True, "group_size": group_size, "symmetric_scale": rule,
            "scale_dtype": "float16"}


CASES: dict[str, dict] = {}
for rule in ("signed", "absmax"):
    for group in (32, 64, None):
        label = f"g{group}" if group else "per-channel"
        CASES[f"W4 sym {label} RTN {rule}"] = {"weights": weights(4, group, rule), "data_free": True}
    for group in (32, 64):
        CASES[f"W4 sym g{group} GPTQ {rule}"] = {  # gguf's contiguous groups; otherwise gptq's defaults
            "weights": weights(4, group, rule), "algorithms": [{"name": "gptq", "static_groups": True}]}
        CASES[f"W4 sym g{group} GPTQ plain {rule}"] = {
            "weights": weights(4, group, rule), "algorithms": [{"name": "gptq", "act_order": False, "mse": False}]}
    CASES[f"W8 sym per-channel RTN {rule}"] = {"weights": weights(8, None, rule), "data_free": True}


if __name__ == "__main__":
    common.case_main(Path(__file__), CASES, "symmetric_scale_results.json")
