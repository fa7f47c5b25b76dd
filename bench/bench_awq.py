"""AWQ benchmark (issue 13): slimquant's `awq` with round-to-nearest and with GPTQ, beside GPTQ alone and
llm-compressor's AWQModifier, on SmolLM2-135M (bench/common.py protocol).

    python bench/bench_awq.py [--only CASE ...] [--llmc-limit SECONDS]

llm-compressor's AWQ runs in its own venv (bench_llmcompressor.py) under a time limit (default 600 s): on these
2 cores it has not finished a whole model; the table then records the limit and how far its progress bar got.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def w(group: int) -> dict:
    return {"bits": 4, "symmetric": False, "group_size": group}


CASES: dict[str, dict] = {
    "W4A16 g64 awq": {"weights": w(64), "algorithms": ["awq"]},
    "W4A16 g128 awq": {"weights": w(128), "algorithms": ["awq"]},
    "W4A16 g64 awq + gptq": {"weights": w(64), "algorithms": ["awq", "gptq"]},
    "W4A16 g128 awq + gptq": {"weights": w(128), "algorithms": ["awq", "gptq"]},
    "W4A16 g64 gptq": {"weights": w(64), "algorithms": ["gptq"]},
    "W4A16 g128 gptq": {"weights": w(128), "algorithms": ["gptq"]},
}
LLMC = "llm-compressor AWQ W4A16 g64"


def run_llmc(limit: int) -> dict:
    started = time.perf_counter()
    try:
        proc = subprocess.run([str(common.LLMC_PYTHON), str(common.LLMC_SCRIPT), "--case", LLMC],
                              capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        progress = [line for line in err.replace("\r", "\n").splitlines() if "it/s" in line or "s/it" in line]
        return {"case": LLMC, "error": f"not finished in {limit} s", "seconds": round(time.perf_counter() - started),
                "last_progress": progress[-1].strip()[:200] if progress else ""}
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if proc.returncode == 0 and lines else {"case": LLMC, "error": proc.stderr[-300:]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--llmc-limit", type=int, default=600)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(common.quantize_and_measure(args.case, CASES[args.case])))
        return
    names = args.only or [*CASES, *([LLMC] if common.LLMC_PYTHON.exists() else [])]
    common.ensure_fp32_cache()
    results = []
    for name in names:
        results.append(run_llmc(args.llmc_limit) if name == LLMC else common.run_isolated(Path(__file__), name))
        print(json.dumps(results[-1]), flush=True)
        common._merge_results(common.OUT / "awq_results.json", results)


if __name__ == "__main__":
    main()
