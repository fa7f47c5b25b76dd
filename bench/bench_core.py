"""Core benchmark (issue 2): round-to-nearest weights and calibrated activations with the built-in `minmax`.

    python bench/bench_core.py [--only CASE ...]

Each case runs in a fresh process: load the fp32 model, quantize (timed; peak RSS read right after, before the
perplexity evaluation whose 2048 x 49152 logits would dominate it), then perplexity on WikiText-2 test.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

W4 = {"bits": 4, "symmetric": False}
CASES: dict[str, dict | None] = {
    "fp32": None,
    "W8A16 per-channel": {"scheme": "W8A16"},
    "W4A16 per-channel": {"weights": W4},
    "W4A16 g128": {"weights": {**W4, "group_size": 128}},
    "W4A16 g64": {"weights": {**W4, "group_size": 64}},
    "W4A16 g128 clip-search": {"weights": {**W4, "group_size": 128}, "algorithms": [{"name": "minmax",
                                                                                       "clip_search": True}]},
    "W8A8 static act_method 1": {"scheme": "W8A8", "algorithms": [{"name": "minmax", "act_method": 1}]},
    "W8A8 static act_method 2": {"scheme": "W8A8", "algorithms": [{"name": "minmax", "act_method": 2}]},
    "W8A8 static act_method 3": {"scheme": "W8A8", "algorithms": [{"name": "minmax", "act_method": 3}]},
    "W8A8 dynamic per-token": {"scheme": "W8A8_DYNAMIC"},
}


if __name__ == "__main__":
    common.case_main(Path(__file__), CASES, "core_results.json")
