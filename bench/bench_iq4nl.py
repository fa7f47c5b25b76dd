"""IQ4_NL (llama.cpp's 16-value non-uniform 4-bit grid, one float16 scale per 32 weights; plugin `iq4nl`) against
Q4_0 (uniform, signed scales, the same size: 4.5 bits per weight), round-to-nearest and GPTQ, on SmolLM2-135M,
WikiText-2 perplexity in memory (the gguf file dequantizes to exactly these weights: plugins/gguf_export/tests).

    python bench/bench_iq4nl.py                      # every case
    python bench/bench_iq4nl.py --only "Q4_0 RTN" "IQ4_NL RTN"

Each case runs in a fresh process (bench/common.py protocol); round-to-nearest runs data-free. GPTQ uses static
groups, as gguf needs contiguous groups. Results: bench/out/iq4nl_results.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

Q4_0 = {"bits": 4, "symmetric": True, "group_size": 32, "scale_dtype": "float16"}
IQ4_NL = {"bits": 4, "group_size": 32}
GPTQ = {"name": "gptq", "static_groups": True}

CASES = {
    "Q4_0 RTN": {"weights": Q4_0, "data_free": True},
    "IQ4_NL RTN": {"weights": IQ4_NL, "algorithms": ["iq4nl"], "data_free": True},
    "Q4_0 GPTQ": {"weights": Q4_0, "algorithms": [GPTQ]},
    "IQ4_NL GPTQ": {"weights": IQ4_NL, "algorithms": ["iq4nl", GPTQ]},
}


if __name__ == "__main__":
    common.case_main(Path(__file__), CASES, "iq4nl_results.json")
