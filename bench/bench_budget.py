"""Budget-driven mixed precision (issue 16) on SmolLM2-135M, WikiText-2 perplexity (bench/common.py protocol).

    python bench/bench_budget.py                 # the three cases, each in its own process

Candidates: 3-bit g128, 4-bit g128, 4-bit g64 (asymmetric) and 8-bit per channel; sensitivity by the proxy on 8
calibration samples; GPTQ as in bench_gptq.py (act_order, mse off). "W4A16 g128 GPTQ" is the uniform baseline.
Results: bench/out/budget_results.json.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import slimquant  # noqa: E402

GPTQ = [{"name": "gptq", "act_order": False, "mse": False}]
CANDIDATES = [{"bits": 3, "group_size": 128, "symmetric": False}, {"bits": 4, "group_size": 128, "symmetric": False},
              {"bits": 4, "group_size": 64, "symmetric": False}, {"bits": 8}]


def budget(avg_bits: float) -> dict:
    return {"weights": {"bits": 4, "group_size": 128, "symmetric": False}, "algorithms": GPTQ,
            "budget": {"avg_bits": avg_bits, "candidates": CANDIDATES, "method": "proxy"}}


CASES: dict[str, dict | None] = {
    "W4A16 g128 GPTQ": {"weights": {"bits": 4, "group_size": 128, "symmetric": False}, "algorithms": GPTQ},
    "budget 4.5 bits GPTQ": budget(4.5),
    "budget 6 bits GPTQ": budget(6.0),
}


def measure_with_bits(name: str) -> dict:
    """common.quantize_and_measure, plus the bits the budget used and how many Linears got each candidate."""
    reports, quantize = [], slimquant.quantize
    slimquant.quantize = lambda *a, **k: reports.append(quantize(*a, **k)) or reports[-1]
    result = common.quantize_and_measure(name, CASES[name])
    chosen = reports[-1].budget if reports else None
    if chosen is not None:
        result.update(avg_bits=round(chosen.avg_bits, 3), budget_avg_bits=round(chosen.budget_avg_bits, 3),
                      mix=dict(Counter(chosen.candidates[c.chosen] for c in chosen.linears)))
    return result


if __name__ == "__main__":
    if "--case" in sys.argv:
        print(json.dumps(measure_with_bits(sys.argv[sys.argv.index("--case") + 1])))
    else:
        common.case_main(Path(__file__), CASES, "budget_results.json")
