"""Rotations (plugin `rotate`: R1 on the residual stream, R2 on the attention heads, fused into the weights) in front
of each quantizer, against the same quantizer alone, on SmolLM2-135M (WikiText-2 perplexity, fp32 20.82).

    python bench/bench_rotate.py                     # every case
    python bench/bench_rotate.py --only "W4 g128 RTN" "rotate + W4 g128 RTN"

"rotate" is R1 + R2 with the guard (each rotation kept where it lowers the rounding error on calibration inputs;
data-free cases compare the weights' own rounding error); "rotate unguarded" keeps every rotation; "rotate online"
adds R4, a Hadamard rotation of down_proj's input at run time.

Each case runs in a fresh process (bench/common.py protocol). SmolLM2's 576-wide residual stream turns by a
576 = 36 x 16 Hadamard matrix (Paley II x Sylvester), its 64-wide heads by a Sylvester one; its tied embeddings
are untied.
Results: bench/out/rotate_results.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

W4_G128 = {"bits": 4, "symmetric": False, "group_size": 128}
W4_G64 = {"bits": 4, "symmetric": False, "group_size": 64}
W4_CHANNEL = {"bits": 4, "symmetric": False, "group_size": None}

BASE: dict[str, dict] = {
    "W4 g128 RTN": {"weights": W4_G128, "data_free": True},
    "W4 per-channel RTN": {"weights": W4_CHANNEL, "data_free": True},
    "W4 g64 HQQ": {"weights": W4_G64, "algorithms": ["hqq"], "data_free": True},
    "W4 g64 NF4": {"weights": {"bits": 4, "group_size": 64}, "algorithms": ["nf4"], "data_free": True},
    "W4 g128 GPTQ": {"weights": W4_G128, "algorithms": ["gptq"]},
    "W4 per-channel GPTQ": {"weights": W4_CHANNEL, "algorithms": ["gptq"]},
    "W8A8 dynamic RTN": {"scheme": "W8A8_DYNAMIC", "data_free": True},
    "W4A8 dynamic GPTQ": {"weights": {"bits": 4, "symmetric": True, "group_size": None},
                          "activations": {"bits": 8, "symmetric": True, "strategy": "token", "dynamic": True},
                          "algorithms": ["gptq"]},
}


def _rotated(case: dict) -> dict:
    algorithms = case.get("algorithms") or ["minmax"]
    return {**case, "algorithms": ["rotate", *algorithms]}


def _online(case: dict) -> dict:
    algorithms = case.get("algorithms") or ["minmax"]
    return {**case, "algorithms": [{"name": "rotate", "online": True}, *algorithms]}


def _unguarded(case: dict) -> dict:
    algorithms = case.get("algorithms") or ["minmax"]
    return {**case, "algorithms": [{"name": "rotate", "guard": False}, *algorithms]}


CASES = {**BASE, **{f"rotate + {name}": _rotated(case) for name, case in BASE.items()},
         **{f"rotate unguarded + {name}": _unguarded(BASE[name]) for name in ("W4 g128 RTN", "W8A8 dynamic RTN",
                                                                             "W4 per-channel GPTQ")},
         **{f"rotate online + {name}": _online(BASE[name]) for name in ("W8A8 dynamic RTN", "W4A8 dynamic GPTQ",
                                                                          "W4 per-channel GPTQ")}}


if __name__ == "__main__":
    common.case_main(Path(__file__), CASES, "rotate_results.json")
