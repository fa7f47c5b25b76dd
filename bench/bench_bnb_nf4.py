"""Proof that slimquant's saved NF4 / FP4 tensors are bitsandbytes' 4-bit layout (issue 15, second half).

bitsandbytes lives in its own environment, so the project's venv stays untouched (it runs on this CPU: 0.50.2):

    python3 -m venv bench/out/bnb-venv && . bench/out/bnb-venv/bin/activate
    pip install -c constraints.txt torch==2.13.0 bitsandbytes==0.50.2
    pip install -c constraints.txt --no-deps -e core -e plugins/nf4
    pip install -c constraints.txt pluggy typer rich pydantic safetensors transformers pyyaml tqdm numpy
    python bench/bench_bnb_nf4.py                   # random Linears (seconds)
    python bench/bench_bnb_nf4.py --model           # every decoder Linear of SmolLM2-135M, and its perplexity

(constraints.txt pins transformers 5.24.0, as the project's venv has it.)

What it does, per case (NF4 and FP4, each with and without double quantization, block 64):

1. slimquant quantizes data-free with the `nf4` plugin and saves the model (`save_quantized`, msModelSlim layout,
   safetensors) into a temporary folder under bench/out/;
2. for each quantized Linear, the saved tensors are turned into bitsandbytes' serialized quant state, the entries a
   bitsandbytes checkpoint holds under `<linear>.weight.*` (absmax, quant_map, nested_absmax, nested_quant_map,
   quant_state.bitsandbytes__nf4), and loaded with `Params4bit.from_prequantized` into a `Linear4bit`, as
   transformers loads a bitsandbytes checkpoint. Nothing is quantized again: the codes are only repacked (the two
   nibbles of each byte swapped; for FP4 each nibble also renumbered, `BITSANDBYTES_NIBBLE`), the scales are copied
   (the double-quantized ones as uint8 indices into a 256-entry table);
3. checks, against slimquant's FakeQuantLinear (what the quantized model computes with):
   - `dequant_max_abs_diff`: `bitsandbytes.functional.dequantize_4bit` against the FakeQuantLinear's weight;
   - `matmul_max_abs_diff`: `bitsandbytes.matmul_4bit` (float32) against the FakeQuantLinear's output, random inputs;
   - `linear4bit_max_abs_diff`: a `Linear4bit` forward, bitsandbytes' float32 path (`support_avx512bf16_for_cpu` off);
   - `linear4bit_bf16_kernel_max_rel_err`: a `Linear4bit` forward with bitsandbytes' default CPU path, which on a CPU
     with AVX512-BF16 repacks the weight and computes in bfloat16 (so only close: relative error of the output);
   - `bnb_quantize_same_nibbles` (without double quant): bitsandbytes' own `quantize_4bit` of the float weight gives
     the same packed bytes (fraction of equal nibbles) and `bnb_quantize_absmax_max_abs_diff` the same absmax.
     bitsandbytes' double quantization rounds the absmax onto its non-linear dynamic map while slimquant's uses a
     linear one, so bitsandbytes cannot *produce* our double-quantized scales; its QuantState holds and
     dequantizes them exactly all the same (state2.code is any 256-entry table).

`--model` also replaces every decoder Linear of SmolLM2 by its `Linear4bit` and measures the WikiText-2 perplexity
(bench/common.py protocol) beside slimquant's in-memory one (26.178 for NF4 block 64 data-free in bench/RESULTS.md).
The last line printed is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BLOCK = 64
CASES = {  # name -> nf4 plugin arguments
    "NF4 block64": {"codebook": "nf4"},
    "NF4 block64 double-quant": {"codebook": "nf4", "double_quant": True},
    "FP4 block64": {"codebook": "fp4"},
    "FP4 block64 double-quant": {"codebook": "fp4", "double_quant": True},
}


def random_model():
    """A 2-layer Llama with random weights and SmolLM2-135M's Linear shapes (576 / 1536 features, 9 heads of 64, 3
    KV heads): 14 Linears, 5184 scales per 576 x 576 Linear (20 blocks of 256 and a shorter one)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def repack(packed: torch.Tensor, quant_type: str) -> torch.Tensor:
    """slimquant's int4x2 bytes (code + 8; column 2j in the low nibble, 2j+1 in the high one) -> bitsandbytes' (the
    first of two consecutive weights in the high nibble; FP4 nibbles numbered by bit pattern), [out*in/2, 1]."""
    from slimquant_nf4.codebooks import BITSANDBYTES_NIBBLE

    nibble = torch.tensor(BITSANDBYTES_NIBBLE[quant_type], dtype=torch.uint8)
    low, high = nibble[(packed & 0x0F).long()], nibble[(packed >> 4).long()]
    return ((low << 4) | high).reshape(-1, 1)


def bnb_state_dict(files, name: str, meta) -> tuple[torch.Tensor, dict]:
    """One saved Linear as bitsandbytes serializes a Linear4bit: the packed weight and its `weight.*` quant state."""
    from bitsandbytes.functional import get_4bit_type
    from bitsandbytes.utils import pack_dict_to_tensor

    from slimquant_nf4.codebooks import BITSANDBYTES_NIBBLE

    quant_type = meta.codebook_name
    if not meta.codebook or quant_type not in ("nf4", "fp4"):
        raise ValueError(f"{name}: not an nf4/fp4 codebook Linear ({meta.codebook_name})")
    if meta.group_size == 0 or meta.in_features % meta.group_size:
        raise ValueError(f"{name}: bitsandbytes blocks the flattened weight; its blocks are slimquant's groups only "
                         f"when in_features ({meta.in_features}) is a multiple of the group ({meta.group_size})")
    code = get_4bit_type(quant_type, device="cpu")
    saved_codebook = files.get(f"{name}.weight_codebook")
    if not torch.equal(code[BITSANDBYTES_NIBBLE[quant_type]], saved_codebook):
        raise ValueError(f"{name}: the saved codebook is not bitsandbytes' {quant_type} table")
    scale = files.get(f"{name}.weight_scale")
    stats = {"quant_map": code}
    info = {"quant_type": quant_type, "blocksize": meta.group_size, "dtype": "float32",
            "shape": (meta.out_features, meta.in_features)}
    if meta.scale_block:  # double quant: int8 codes of (absmax - mean), a step per block of scale_block scales
        stats["absmax"] = (scale.reshape(-1).to(torch.int16) + 128).to(torch.uint8)
        stats["nested_absmax"] = files.get(f"{name}.weight_scale_scale").float()
        stats["nested_quant_map"] = torch.arange(-128, 128, dtype=torch.float32)  # index i stands for code i - 128
        info.update(nested_blocksize=meta.scale_block, nested_dtype="float32",
                    nested_offset=float(files.get(f"{name}.weight_scale_offset").reshape(())))
    else:
        stats["absmax"] = scale.reshape(-1).float()
    stats[f"quant_state.bitsandbytes__{quant_type}"] = pack_dict_to_tensor(info)
    return repack(files.get(f"{name}.weight"), quant_type), stats


def bnb_linear(files, name: str, meta, bias: torch.Tensor | None, bf16_kernel: bool = False):
    """A bitsandbytes Linear4bit holding the saved Linear, loaded as transformers loads a bnb checkpoint."""
    from bitsandbytes.nn import Linear4bit, Params4bit

    data, stats = bnb_state_dict(files, name, meta)
    layer = Linear4bit(meta.in_features, meta.out_features, bias=bias is not None, compute_dtype=torch.float32,
                       compress_statistics=bool(meta.scale_block), quant_type=meta.codebook_name, device="meta")
    layer.weight = Params4bit.from_prequantized(data, stats, device="cpu", module=layer)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
    if not bf16_kernel:
        layer.support_avx512bf16_for_cpu = False  # matmul_4bit's float32 path: dequantize_4bit, then F.linear
    return layer.eval()


def fake_linears(model) -> dict:
    from slimquant.quant.fake_linear import FakeQuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


@torch.no_grad()
def check_linear(files, name: str, meta, fake, float_weight: torch.Tensor | None, rows: int = 16) -> dict:
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    from slimquant.loader import read_linear

    layer = bnb_linear(files, name, meta, fake.bias)
    state = layer.weight.quant_state
    data, stats = bnb_state_dict(files, name, meta)
    expected = {"weight": data, **{f"weight.{k}": v for k, v in stats.items()}}
    if fake.bias is not None:
        expected["bias"] = fake.bias
    saved = layer.state_dict()  # what bitsandbytes would write for this Linear4bit
    ours = fake.weight
    from_disk = read_linear(files, name, meta)[0].dequantize()
    x = torch.randn(rows, meta.in_features, generator=torch.Generator().manual_seed(1))
    reference = fake(x)
    result = {
        "disk_equals_memory": bool(torch.equal(from_disk, ours)),
        "state_dict_round_trip": saved.keys() == expected.keys() and all(torch.equal(saved[k], v)
                                                                          for k, v in expected.items()),
        "dequant_max_abs_diff": float((dequantize_4bit(layer.weight.data, state) - ours).abs().max()),
        "matmul_max_abs_diff": float((bnb.matmul_4bit(x, layer.weight, quant_state=state) - reference).abs().max()),
        "linear4bit_max_abs_diff": float((layer(x) - reference).abs().max()),
    }
    fused = bnb_linear(files, name, meta, fake.bias, bf16_kernel=True)
    result["linear4bit_bf16_kernel_max_rel_err"] = float((fused(x) - reference).norm() / reference.norm())
    if float_weight is not None and not meta.scale_block:
        packed, theirs_state = quantize_4bit(float_weight, blocksize=meta.group_size, compress_statistics=False,
                                             quant_type=meta.codebook_name)
        ours_packed = layer.weight.data.reshape(-1)
        theirs = packed.reshape(-1)
        same = ((ours_packed & 0xF) == (theirs & 0xF)).sum() + ((ours_packed >> 4) == (theirs >> 4)).sum()
        result["bnb_quantize_same_nibbles"] = float(same) / (2 * theirs.numel())
        result["bnb_quantize_same_values"] = float((dequantize_4bit(packed, theirs_state) == ours).float().mean())
        result["bnb_quantize_absmax_max_abs_diff"] = float((theirs_state.absmax - state.absmax).abs().max())
    return result


def summarize(per_linear: dict[str, dict]) -> dict:
    values = list(per_linear.values())
    out = {"linears": len(values), "disk_equals_memory": all(v["disk_equals_memory"] for v in values),
           "state_dict_round_trip": all(v["state_dict_round_trip"] for v in values)}
    for key in ("dequant_max_abs_diff", "matmul_max_abs_diff", "linear4bit_max_abs_diff",
                "linear4bit_bf16_kernel_max_rel_err", "bnb_quantize_absmax_max_abs_diff"):
        if key in values[0]:
            out[key] = max(v[key] for v in values)
    for key in ("bnb_quantize_same_nibbles", "bnb_quantize_same_values"):
        if key in values[0]:
            out[key] = min(v[key] for v in values)
    out["exact"] = out["dequant_max_abs_diff"] == 0 and out["matmul_max_abs_diff"] == 0 and \
        out["linear4bit_max_abs_diff"] == 0 and out["disk_equals_memory"] and out["state_dict_round_trip"]
    return out


def quantize_and_save(model, args: dict, out: Path):
    import slimquant
    from slimquant.export import save_quantized

    recipe = {"weights": {"bits": 4, "group_size": BLOCK}, "algorithms": [{"name": "nf4", **args}],
              "runtime": {"progress": False}}
    report = slimquant.quantize(model, recipe)
    save_quantized(model, out, save_type=["safe_tensor"], linear_types=report.linear_types())


def run_case(model, args: dict, keep_float: bool = True) -> tuple[dict, dict, Path, tempfile.TemporaryDirectory]:
    from slimquant.export.reader import QuantizedFiles

    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    float_weights = {n: model.get_submodule(n).weight.detach().clone() for n in linears} if keep_float else {}
    tmp = tempfile.TemporaryDirectory(dir=common.OUT, prefix="bnb-nf4-")
    out = Path(tmp.name) / "out"
    quantize_and_save(model, args, out)
    files = QuantizedFiles(out)
    fakes = fake_linears(model)
    per_linear = {name: check_linear(files, name, meta, fakes[name], float_weights.get(name))
                  for name, meta in files.meta.linears.items()}
    return summarize(per_linear), per_linear, out, tmp


def swap_in_bnb(model, out: Path, bf16_kernel: bool) -> int:
    """Replace every quantized Linear of `model` by the Linear4bit loaded from the saved files."""
    from slimquant.export.reader import QuantizedFiles

    files = QuantizedFiles(out)
    fakes = fake_linears(model)
    for name, meta in files.meta.linears.items():
        model.set_submodule(name, bnb_linear(files, name, meta, fakes[name].bias, bf16_kernel))
    return len(files.meta.linears)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="store_true", help="SmolLM2-135M: every decoder Linear, and perplexity")
    parser.add_argument("--case", nargs="*", choices=list(CASES), help="cases to run (default: all; --model: NF4)")
    parser.add_argument("--bf16-kernel", action="store_true",
                        help="--model: the perplexity with bitsandbytes' default CPU path (bfloat16 on AVX512-BF16)")
    args = parser.parse_args()
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    result = {"bitsandbytes": bnb.__version__, "torch": torch.__version__, "avx512_bf16": bool(has_avx512bf16()),
              "mode": "model" if args.model else "random", "cases": {}}
    names = args.case or (["NF4 block64"] if args.model else list(CASES))
    for name in names:
        if not args.model:
            summary, _, _, tmp = run_case(random_model(), CASES[name])
            tmp.cleanup()
            result["cases"][name] = summary
            print(name, json.dumps(summary), flush=True)
            continue
        model, tokenizer = common.load_fp32()
        tokens = common.eval_tokens(tokenizer)
        summary, _, out, tmp = run_case(model, CASES[name])
        summary["ppl_slimquant"] = round(common.perplexity(model, tokens), 3)
        summary["bnb_linears"] = swap_in_bnb(model, out, args.bf16_kernel)
        summary["ppl_bnb_linear4bit"] = round(common.perplexity(model, tokens), 3)
        summary["bnb_kernel"] = "default CPU path" if args.bf16_kernel else "float32 (dequantize_4bit + F.linear)"
        tmp.cleanup()
        result["cases"][name] = summary
        print(name, json.dumps(summary), flush=True)
    result["all_exact"] = all(c["exact"] for c in result["cases"].values())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
