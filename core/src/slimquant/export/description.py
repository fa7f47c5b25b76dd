"""The `slimquant` section of quant_model_description_<type>.json as pydantic models: what a reader may trust.

`slimquant.export.layout.description` writes it and checks it with `parse_output_meta` before writing; the
reader checks it again before using any of it. Every field is typed (strictly: no "8" for 8) and ranged,
per-Linear entries are closed (extra="forbid"), and weight-file names are plain names inside the output
directory. A problem becomes an OutputError naming the Linear and the field.
"""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimquant.errors import OutputError
from slimquant.export.packing import MAX_PACKED_BITS, PACK_INT4
from slimquant.quant.qweight import num_groups

FORMAT_VERSION = 2
SHOWN_ERRORS = 3
# tensor suffixes of a quantized Linear (`slimquant.export.layout`); an extra tensor may not take one of them
LINEAR_SUFFIXES = ("weight", "weight_scale", "weight_offset", "weight_scale_second", "weight_offset_second",
                   "weight_codebook", "weight_scale_scale",
                   "weight_scale_offset", "g_idx", "bias", "input_scale", "input_offset", "deq_scale", "quant_bias",
                   "weight_outlier_index", "weight_outlier_value")

Bits = Annotated[int, Field(ge=1, le=8)]
ExtraName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def is_plain_file_name(name: str) -> bool:
    """A name that can only mean a file directly inside a directory: no separator, not '.', '..', absolute
    or empty (on POSIX and on Windows)."""
    return (name not in ("", ".", "..") and "\0" not in name
            and PurePosixPath(name).name == name == PureWindowsPath(name).name)


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())


class ActMeta(_Closed):
    bits: Bits
    symmetric: bool
    dynamic: bool
    per_channel: bool | None = None  # static only: input_scale is [in_features] (True) or [1] (False)

    @model_validator(mode="after")
    def _granularity_only_when_static(self) -> ActMeta:
        if self.dynamic and self.per_channel is not None:
            raise ValueError("per_channel is only for static activations (dynamic: true has no stored scale)")
        if not self.dynamic and self.per_channel is None:
            raise ValueError("static activations (dynamic: false) need per_channel: true or false")
        return self


class LinearMeta(_Closed):
    type: str = Field(min_length=1)
    bits: Bits
    symmetric: bool
    group_size: int = Field(ge=0)  # 0: one group per output channel
    in_features: int = Field(gt=0)
    out_features: int = Field(gt=0)
    groups: int = Field(gt=0)
    pack: Literal[PACK_INT4] | None
    g_idx: bool
    extras: list[ExtraName]
    bias: bool
    act: ActMeta | None
    int_kernel: bool
    codebook: bool = False  # a non-uniform grid: weight_codebook holds the value of each code
    codebook_name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")  # its name, e.g. "nf4" (optional)
    scale_block: int = Field(0, ge=0)  # > 0: weight_scale stored as int8 codes in blocks of this many (layout)
    channel_bits: int = Field(0, ge=0, le=8)  # > 0: two-level scales, weight_scale [out, 1] + weight_scale_second
    outliers: int = Field(0, ge=0)  # > 0: this many outliers in weight_outlier_index / weight_outlier_value
    sparsity: str | None = Field(None, pattern=r"^(unstructured|[1-9][0-9]*:[1-9][0-9]*)$")  # pruned: the pattern

    @model_validator(mode="after")
    def _consistent(self) -> LinearMeta:
        if self.pack is not None and self.bits > MAX_PACKED_BITS:
            raise ValueError(f"field pack: {self.pack} holds codes of at most {MAX_PACKED_BITS} bits, "
                             f"but bits is {self.bits}")
        expected = num_groups(self.in_features, self.group_size or None)
        if self.groups != expected:
            raise ValueError(f"field groups: {self.groups}, but in_features {self.in_features} in groups of "
                             f"{self.group_size or 'all (per channel)'} make {expected}")
        clashing = [e for e in self.extras if e in LINEAR_SUFFIXES]
        if clashing or len(set(self.extras)) != len(self.extras):
            raise ValueError(f"field extras: names must be unique and not one of {', '.join(LINEAR_SUFFIXES)}")
        if self.int_kernel != self.integer_kernel_applies():
            raise ValueError(f"field int_kernel: must be {str(self.integer_kernel_applies()).lower()} for this "
                             "scheme (only static per-tensor activations with symmetric per-channel weights)")
        return self

    def integer_kernel_applies(self) -> bool:
        """deq_scale and quant_bias are saved (see slimquant.export.layout)."""
        act = self.act
        return (act is not None and not act.dynamic and not act.per_channel and self.symmetric and self.groups == 1
                and not self.codebook)

    def tensor_suffixes(self) -> set[str]:
        """The tensors `<name>.<suffix>` this Linear may have in the weight files."""
        suffixes = {"weight", "weight_scale", "weight_offset", *self.extras}
        if self.g_idx:
            suffixes.add("g_idx")
        if self.codebook:
            suffixes.add("weight_codebook")
        if self.channel_bits:
            suffixes |= {"weight_scale_second", "weight_offset_second"}
        if self.scale_block:
            suffixes |= {"weight_scale_scale", "weight_scale_offset"}
        if self.outliers:
            suffixes |= {"weight_outlier_index", "weight_outlier_value"}
        if self.bias:
            suffixes.add("bias")
        if self.act is not None and not self.act.dynamic:
            suffixes |= {"input_scale", "input_offset"}
        if self.int_kernel:
            suffixes |= {"deq_scale", "quant_bias"}
        return suffixes


class KVLayerMeta(_Closed):
    kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)


class KVCacheMeta(_Closed):
    """The quantized attention cache (`slimquant.export.kv_cache`): one setting for every attention module."""

    bits: Bits
    symmetric: bool
    dynamic: bool
    layers: dict[str, KVLayerMeta]  # attention module name -> what it caches per token


class OutputMeta(_Closed):
    format: int
    model_type: str | None  # model.config.model_type at save time (None: the model had no config)
    architectures: list[str] | None  # model.config.architectures, where present
    float_tensors: list[str]  # the float model's state-dict keys: a quantized Linear counts as weight (+ bias)
    linears: dict[str, LinearMeta]
    tied: dict[str, str]  # alias -> the tensor it shares storage with
    files: dict[str, Sha256] = {}  # weight file name -> sha256
    kv_cache: KVCacheMeta | None = None  # the attention cache, when it is quantized

    @field_validator("files")
    @classmethod
    def _plain_file_names(cls, files: dict[str, str]) -> dict[str, str]:
        for name in files:
            if not is_plain_file_name(name):
                raise ValueError(f"{name!r} is not a plain file name inside the output directory")
        return files

    @model_validator(mode="after")
    def _tensors_consistent(self) -> OutputMeta:
        known = set(self.float_tensors)
        for name, linear in self.linears.items():
            if f"{name}.weight" not in known:
                raise ValueError(f"field float_tensors: lacks {name}.weight of the quantized Linear {name}")
            if (f"{name}.bias" in known) != linear.bias:
                raise ValueError(f"field float_tensors: {'lacks' if linear.bias else 'holds'} {name}.bias, but "
                                 f"Linear {name} has bias: {str(linear.bias).lower()}")
        for alias, source in self.tied.items():
            if alias not in known or source not in known:
                raise ValueError(f"field tied: {alias} -> {source} names a tensor float_tensors lacks")
        return self


def _error_text(error: dict) -> str:
    loc = [str(part) for part in error["loc"]]
    message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    if len(loc) >= 2 and loc[0] == "linears":
        where = f"Linear {loc[1]}" + (f", field {'.'.join(loc[2:])}" if loc[2:] else "")
    else:
        where = f"field {'.'.join(loc)}" if loc else ""
    return f"{where}: {message}" if where else message


def parse_output_meta(section: object, source: str) -> OutputMeta:
    """The checked `slimquant` section of the description named `source` (an OutputError when it is bad)."""
    if not isinstance(section, dict) or "linears" not in section:
        raise OutputError(f"{source}: no slimquant metadata; only outputs written by slimquant can be loaded")
    version = section.get("format")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise OutputError(f"{source}: slimquant output format {version!r}, but this slimquant reads format "
                          f"{FORMAT_VERSION} only (it records the architecture and every model tensor); re-save "
                          "the output with this slimquant (quantize and save again)")
    try:
        return OutputMeta.model_validate(section)
    except ValidationError as exc:
        errors = exc.errors()
        shown = "; ".join(_error_text(e) for e in errors[:SHOWN_ERRORS])
        more = f" (and {len(errors) - SHOWN_ERRORS} more)" if len(errors) > SHOWN_ERRORS else ""
        raise OutputError(f"{source}: invalid slimquant metadata: {shown}{more}") from None
