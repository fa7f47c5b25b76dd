"""Budget-driven mixed precision (issue 16) on SmolLM2-135M, WikiText-2 perplexity (bench/common.py protocol).

    python bench/bench_budget.py [--only CASE ...]      # each case in its own process

Candidates: 3-bit g128, 4-bit g128, 4-bit g64 (asymmetric) and 8-bit per channel, and in the "w3-w8" cases also
5-bit g128 and 6-bit per channel; sensitivity by the proxy on 8 calibration samples; GPTQ as in bench_gptq.py
(act_order, mse off) or with its defaults. "W4A16 g128 GPTQ" (defaults) is the uniform baseline.
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


# with 5- and 6-bit steps between w4 g64 and w8, so that a 6-bit budget need not jump from 4 to 8 bits
WIDER = [*CANDIDATES[:3], {"bits": 5, "group_size": 128, "symmetric": False}, {"bits": 6}, {"bits": 8}]


def budget(avg_bits: float, algorithms=GPTQ, candidates=CANDIDATES) -> dict:
    return {"weights": {"bits": 4, "group_size": 128, "symmetric": False}, "algorithms": algorithms,
            "budget": {"avg_bits": avg_bits, "candidates": candidates, "method": "proxy"}}


CASES: dict[str, dict | None] = {
    "W4A16 g128 GPTQ": {"weights": {"bits": 4, "group_size": 128, "symmetric": False}, "algorithms": GPTQ},
    "budget 4.5 bits GPTQ": budget(4.5),
    "budget 6 bits GPTQ": budget(6.0),
    "budget 4.5 bits GPTQ, w3-w8": budget(4.5, GPTQ, WIDER),
    "budget 6 bits GPTQ, w3-w8": budget(6.0, GPTQ, WIDER),
    # GPTQ with its defaults (act_order, mse) and the wider candidate set
    "W4A16 g128 GPTQ defaults": {"weights": {"bits": 4, "group_size": 128, "symmetric": False},
                                 "algorithms": ["gptq"]},
    "budget 4.5 bits GPTQ defaults, w3-w8": budget(4.5, ["gptq"], WIDER),
    "budget 6 bits GPTQ defaults, w3-w8": budget(6.0, ["gptq"], WIDER),
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
