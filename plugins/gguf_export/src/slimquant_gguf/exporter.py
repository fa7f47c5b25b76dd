"""`gguf`: one .gguf file that llama.cpp loads, for the architectures of slimquant_gguf.llama (Llama, Mistral,
Qwen2, Qwen3): quantized Linears as Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 blocks, Q4_K / Q6_K from the kquant grid, or
IQ4_NL from the iq4nl grid, built from their codes and scales (no re-quantization), every other tensor in float32.
Other architectures are refused before any weight is read (`check_model`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal

import gguf
from pydantic import BaseModel, ConfigDict

from slimquant.sdk import (
    Exporter,
    FakeQuantLinear,
    Feature,
    OutputError,
    QuantizedWeight,
    hookimpl,
    kv_attention,
    summarize,
)
from slimquant_gguf.blocks import TYPES, encode_blocks, encode_iq4nl_blocks, written_as_iq4nl
from slimquant_gguf.checks import module_problems, plan_problems
from slimquant_gguf.kblocks import encode_k_blocks, written_as_k
from slimquant_gguf.llama import ARCHITECTURES, arch_name, gguf_name, permute_rows, rope_heads, write_hyperparameters
from slimquant_gguf.tokenizer import copy_tokenizer

FILE_NAME = "model.gguf"
FILE_TYPES = {kind: gguf.LlamaFileType[f"MOSTLY_{kind.name}"] for kind in TYPES.values()}
FILE_TYPES[gguf.GGMLQuantizationType.Q4_K] = gguf.LlamaFileType.MOSTLY_Q4_K_S
FILE_TYPES[gguf.GGMLQuantizationType.Q6_K] = gguf.LlamaFileType.MOSTLY_Q6_K
FILE_TYPES[gguf.GGMLQuantizationType.IQ4_NL] = gguf.LlamaFileType.MOSTLY_IQ4_NL


def _model_problems(model) -> list[str]:
    if kv_attention.quantizers(model):
        return ["the model's KV cache is quantized (kv_cache); gguf has no place for its scales"]
    return _architecture_problems(model.config)


def _architecture_problems(config) -> list[str]:
    if config.model_type not in ARCHITECTURES:
        return [f"the model is a {config.model_type!r} model; the gguf exporter writes "
                f"{', '.join(ARCHITECTURES)} models"]
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", "default") != "default":
        return [f"rope_parameters.rope_type {rope['rope_type']!r}: the gguf exporter writes default RoPE only"]
    return []


def _permuted(qw: QuantizedWeight, heads: int | None) -> QuantizedWeight:
    if heads is None:
        return qw
    rows = lambda t: None if t is None else permute_rows(t, heads)  # noqa: E731
    return QuantizedWeight(rows(qw.codes), rows(qw.scale), rows(qw.zero), qw.bits, qw.group_size, codebook=qw.codebook)


class GGUFExporter(Exporter):
    name = "gguf"
    scale_dtype = "float16"
    # K-quant super-blocks (their mins make fractional zero points; Q4_1 / Q5_1 refuse them in check); pruned codes;
    # IQ4_NL's codebook (check refuses every other codebook, by plan and by module)
    holds = frozenset({Feature.QUANTIZED_SCALES, Feature.FRACTIONAL_ZEROS, Feature.SPARSITY, Feature.CODEBOOK})

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["gguf"] = "gguf"

    def __init__(self, config: BaseModel | None = None):
        self.config = config

    @hookimpl
    def check(self, plan, name, shape):
        return plan_problems(plan, name, shape)

    @hookimpl
    def check_model(self, ctx):
        return _architecture_problems(ctx.model.config)

    @hookimpl
    def export(self, model, output_dir, options):
        config = model.config
        fakes = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
        problems = _model_problems(model)
        if problems:
            raise OutputError("gguf cannot hold this model: " + "; ".join(problems))
        for n, m in fakes.items():
            problems += module_problems(n, m)
        tensors = self._tensor_list(model, fakes, problems)
        if problems:
            raise OutputError("gguf cannot hold this model exactly: " + summarize(problems, fakes))
        path = Path(output_dir) / FILE_NAME
        writer = gguf.GGUFWriter(path, arch_name(config))
        write_hyperparameters(writer, config, getattr(config, "_name_or_path", "") or type(model).__name__)
        copy_tokenizer(writer, config)
        kinds = Counter()
        for gname, hf_name, value in tensors:
            heads = rope_heads(hf_name, config)
            if isinstance(value, FakeQuantLinear):
                qw = _permuted(value.qweight, heads)
                if written_as_iq4nl(qw):
                    data, kind = encode_iq4nl_blocks(qw)
                else:
                    data, kind = encode_k_blocks(qw) if written_as_k(qw) else encode_blocks(qw)
                writer.add_tensor(gname, data, raw_dtype=kind)
                kinds[kind] += 1
            else:
                t = value.detach().cpu().float()
                writer.add_tensor(gname, (t if heads is None else permute_rows(t, heads)).numpy())
        writer.add_file_type(FILE_TYPES[kinds.most_common(1)[0][0]] if kinds else gguf.LlamaFileType.ALL_F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return [path]

    @staticmethod
    def _tensor_list(model, fakes: dict, problems: list[str]) -> list[tuple[str, str, object]]:
        """(gguf name, HF name, tensor or FakeQuantLinear) in state-dict order; the tied lm_head left out."""
        config = model.config
        tie = bool(getattr(config, "tie_word_embeddings", False))
        out, done = [], set()
        for key, t in model.state_dict(keep_vars=True).items():
            owner, _, leaf = key.rpartition(".")
            if owner in fakes:
                if owner in done:
                    continue
                done.add(owner)
                key, t = f"{owner}.weight", fakes[owner]
                if fakes[owner].bias is not None:
                    out.append((gguf_name(f"{owner}.bias", config), f"{owner}.bias", fakes[owner].bias))
            if tie and key == "lm_head.weight":
                continue
            gname = gguf_name(key, config)
            if gname is None:
                problems.append(f"tensor {key} has no gguf name in a {arch_name(config)} model (changed by "
                                "smoothing?)")
                continue
            out.append((gname, key, t))
        return out
