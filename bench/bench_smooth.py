"""Outlier-suppression benchmark (issue 5): SmoothQuant, Shift (OS+), Shift+SmoothQuant and PaddleSlim's piecewise
search before W8A8 quantization of SmolLM2-135M; WikiText-2 test perplexity (protocol: bench/common.py). Static
activations per tensor with act_method 1 (min-max), 2 (histogram search) or 3 (per-Linear choice); dynamic per token.

    python bench/bench_smooth.py                    # the main table (every case of CASES)
    python bench/bench_smooth.py --only "W8A8 static am3 | none" ...
    python bench/bench_smooth.py --list             # case names, including the alpha sweeps

Each case runs in a fresh process: load fp32, smooth + quantize layer by layer (timed; peak RSS right after), then
perplexity on 16 x 2048 tokens. Calibration: 32 x 512 tokens of wiki.valid.tokens.
Results: bench/out/smooth_results.json.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCHEMES = {
    "W8A8 static am1": {"scheme": "W8A8", "minmax": {"name": "minmax", "act_method": 1}},
    "W8A8 static am2": {"scheme": "W8A8", "minmax": {"name": "minmax", "act_method": 2}},
    "W8A8 static am3": {"scheme": "W8A8", "minmax": {"name": "minmax", "act_method": 3}},
    "W8A8 dynamic": {"scheme": "W8A8_DYNAMIC", "minmax": {"name": "minmax"}},
}


def sq(alpha: float, all_linears: bool = True) -> list[dict]:
    return [{"name": "smoothquant", "alpha": alpha, "smooth_all_linears": all_linears}]


SHIFT = [{"name": "shift", "shift_all_linears": True}]
PIECEWISE = [{"name": "piecewise", "k_piece": 3, "smooth_all_linears": True}]
SMOOTHERS: dict[str, list[dict]] = {
    "none": [],
    "smoothquant a0.5 norms only": sq(0.5, all_linears=False),
    **{f"smoothquant a{a}": sq(a) for a in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)},
    "shift": SHIFT,
    "shift norms only": [{"name": "shift"}],
    "shift+smoothquant a0.5": SHIFT + sq(0.5),
    "piecewise k3": PIECEWISE,
    "shift+piecewise k3": SHIFT + PIECEWISE,
}
GPTQ = importlib.util.find_spec("slimquant_gptq") is not None


def recipe(scheme: str, smoothers: list[dict], gptq: bool = False) -> dict:
    spec = SCHEMES[scheme]
    if spec["scheme"] == "W8A8_DYNAMIC":  # the piecewise search simulates per-token activations too
        smoothers = [{**s, "act_quant_method": "abs_max_token"} if s["name"] == "piecewise" else s for s in smoothers]
    algorithms = smoothers + [spec["minmax"]] + ([{"name": "gptq"}] if gptq else [])
    return {"scheme": spec["scheme"], "algorithms": algorithms}


CASES: dict[str, dict | None] = {"fp32": None}
for _scheme in SCHEMES:
    for _name, _smoothers in SMOOTHERS.items():
        CASES[f"{_scheme} | {_name}"] = recipe(_scheme, _smoothers)
    if GPTQ:
        for _name in ("none", "smoothquant a0.5", "piecewise k3"):
            CASES[f"{_scheme} | {_name} + gptq"] = recipe(_scheme, SMOOTHERS[_name], gptq=True)

if __name__ == "__main__":
    if "--list" in sys.argv:
        print("\n".join([*CASES, *(n for n in common.llmcompressor_cases() if "W8A8" in n)]))
    else:
        common.case_main(Path(__file__), CASES, "smooth_results.json", side_by_side="W8A8")
