"""Round trip on the real model (issue 3): quantize SmolLM2-135M W8A8 and W4A16 g128, save as safetensors + numpy
and as 0.1 GB shards, load each back into a fresh fp32 model, compare logits; `slimquant inspect` each output.

    python bench/roundtrip_smollm2.py        # writes under bench/out/roundtrip/, prints a Markdown table

Calibration: 8 x 256 tokens of wiki.valid.tokens (this checks saving, not accuracy).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import slimquant  # noqa: E402
from slimquant.export import save_quantized  # noqa: E402
from slimquant.export.reader import QuantizedFiles  # noqa: E402
from slimquant.loader import load_quantized  # noqa: E402

RECIPES = {
    "W8A8": {"scheme": "W8A8"},
    "W4A16 g128": {"weights": {"bits": 4, "symmetric": False, "group_size": 128}},
}
OUT = common.OUT / "roundtrip"


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def numpy_matches(directory: Path) -> bool:
    """Every array of the .npz files equals its tensor in the safetensors output (quant_weight.npz and
    <suffix>.npz are keyed by Linear name, float_weights.npz by full tensor name)."""
    files = QuantizedFiles(directory)
    for npz in directory.glob("*.npz"):
        suffix = {"quant_weight": "weight", "float_weights": ""}.get(npz.stem, npz.stem)
        with np.load(npz, allow_pickle=False) as arrays:
            for key in arrays.files:
                tensor = files.get(f"{key}.{suffix}" if suffix else key)
                tensor = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
                if not np.array_equal(arrays[key], tensor.numpy()):
                    return False
    return True


def mb(directory: Path, pattern: str) -> float:
    return sum(p.stat().st_size for p in directory.glob(pattern)) / 2**20


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    ids = torch.tensor([list(range(1000, 1128))])
    rows = []
    for label, recipe in RECIPES.items():
        model, tokenizer = common.load_fp32()
        samples = common.calib_samples(tokenizer, count=8, seqlen=256)
        slimquant.quantize(model, {**recipe, "runtime": {"progress": False}}, samples=samples)
        expected = logits(model, ids)
        tag = label.replace(" ", "-")
        whole, sharded = OUT / f"{tag}", OUT / f"{tag}-shards"
        save_quantized(model, whole, save_type=["safe_tensor", "numpy"])
        save_quantized(model, sharded, part_file_size=0.1)
        for directory, form in ((whole, "one file (+ numpy)"), (sharded, "0.1 GB shards")):
            loaded = load_quantized(common.load_fp32()[0], directory)
            diff = float((logits(loaded, ids) - expected).abs().max())
            shards = len(list(directory.glob("*.safetensors")))
            rows.append((label, form, shards, round(mb(directory, "*.safetensors"), 1), diff,
                         numpy_matches(directory) if form.startswith("one") else "-"))
            print(subprocess.run(["slimquant", "inspect", str(directory)], capture_output=True, text=True).stdout)
    print("| scheme | saved as | safetensors files | safetensors MB | max abs logit diff after reload | "
          "numpy = safetensors |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
