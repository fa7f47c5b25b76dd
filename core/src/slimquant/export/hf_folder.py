"""A Hugging Face model folder, for exporters whose format is one (compressed-tensors, GPTQ checkpoints): the
checkpoint's tensor names checked against the model class transformers will build from the config, and the files
(model.safetensors or shards + index, config.json with the exporter's `quantization_config`,
generation_config.json). `fmt` names the calling format in error messages."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from slimquant.errors import OutputError
from slimquant.export.writers import plan_shards, save_safetensors
from slimquant.quant.fake_linear import FakeQuantLinear

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def reference_model(model: nn.Module) -> nn.Module:
    """The module tree `AutoModelForCausalLM.from_pretrained` builds from this config, without weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model.config)


def check_structure(model: nn.Module, reference: nn.Module, fakes: dict[str, FakeQuantLinear], fmt: str) -> list[str]:
    """Every quantized Linear must be an nn.Linear of the same shape in the model transformers builds (not a
    GPT-2 Conv1D or a slice of fused MoE expert tensors, which slimquant rewrites into Linears)."""
    problems = []
    for name, fake in fakes.items():
        try:
            target = reference.get_submodule(name)
        except AttributeError:
            target = None
        if not isinstance(target, nn.Linear) or tuple(target.weight.shape) != tuple(fake.qweight.shape):
            problems.append(f"{name}: transformers' {type(reference).__name__} has no nn.Linear "
                            f"{list(fake.qweight.shape)} there (a Conv1D or fused expert tensors?); {fmt} "
                            "quantizes nn.Linear modules only")
    return problems


def float_tensors(model: nn.Module, reference: nn.Module, fakes: dict[str, FakeQuantLinear],
                  dtype: torch.dtype, fmt: str) -> dict[str, torch.Tensor]:
    """Every tensor outside the quantized Linears, as transformers names it; a weight tied by the config to an
    earlier one (lm_head to the embeddings) is left out, as save_pretrained does."""
    expected = reference.state_dict()
    tie = bool(getattr(model.config, "tie_word_embeddings", False))
    seen: set[int] = set()
    out = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if key.rpartition(".")[0] in fakes:
            continue
        if key not in expected or tuple(expected[key].shape) != tuple(t.shape):
            raise OutputError(f"tensor {key} {list(t.shape)} is not in transformers' {type(reference).__name__} as "
                              "such; the model's structure was changed (smoothing biases, rewritten modules?) in "
                              f"a way a {fmt} checkpoint cannot hold")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen and tie:
            continue
        seen.add(ptr)
        out[key] = t.detach().cpu().to(dtype if t.is_floating_point() else t.dtype).clone()
    return out


def refuse_shared_folder(out_dir: Path, fmt: str) -> None:
    """A Hugging Face folder holds one model: refuse to write over another format's (save_type with two of them)."""
    taken = sorted(p.name for p in (out_dir / "config.json", out_dir / SINGLE, out_dir / INDEX) if p.exists())
    if taken:
        raise OutputError(f"{fmt}: {', '.join(taken)} already written in this output by another format of "
                          "save_type; save each Hugging Face format into its own directory")


def _own_storages(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage: the scales of q/k/v that GPTQ quantized stacked are views of one
    tensor, and their act-order g_idx is one tensor. Such tensors are copied."""
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        whole = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        out[key] = t if whole and t.is_contiguous() and ptr not in seen else t.contiguous().clone()
        seen.add(ptr)
    return out


def write_tensors(tensors: dict[str, torch.Tensor], out_dir: Path, part_file_size: float) -> list[Path]:
    tensors = _own_storages(tensors)
    shards = plan_shards(tensors, part_file_size)
    if len(shards) == 1:
        path = out_dir / SINGLE
        save_safetensors(tensors, path)
        return [path]
    written, weight_map = [], {}
    for i, keys in enumerate(shards, start=1):
        path = out_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors({k: tensors[k] for k in keys}, path)
        weight_map.update(dict.fromkeys(keys, path.name))
        written.append(path)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = out_dir / INDEX
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [*written, index]


def write_configs(model: nn.Module, quant_config: dict, dtype: torch.dtype, out_dir: Path) -> list[Path]:
    config = model.config.to_dict()
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = quant_config
    path = out_dir / "config.json"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    written = [path]
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(out_dir))
        written.append(out_dir / "generation_config.json")
    return written


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the folder declares and its float tensors keep: the model's (its input embeddings')."""
    return model.get_input_embeddings().weight.dtype


def write_folder(model: nn.Module, tensors: dict[str, torch.Tensor], quant_config: dict, dtype: torch.dtype,
                 output_dir, options: dict | None, fmt: str) -> list[Path]:
    """The whole folder: refuse another format's in the same output, then the tensors (sharded as
    options["part_file_size"] asks), config.json and generation_config.json."""
    out_dir = Path(output_dir)
    refuse_shared_folder(out_dir, fmt)
    files = write_tensors(tensors, out_dir, (options or {}).get("part_file_size", 0) or 0)
    return files + write_configs(model, quant_config, dtype, out_dir)
