"""The recipe: one validated description of a quantization run, from YAML, JSON or Python."""

from __future__ import annotations

import json
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimquant.config.budget import BudgetSpec
from slimquant.config.kv_cache import KVCacheArgs
from slimquant.config.scheme import PRESETS, ActArgs, PresetName, Scheme, WeightArgs, merge_args
from slimquant.errors import RecipeError

DeviceName = str  # "auto", "cpu", "cuda", "cuda:1", "npu", "npu:0"
MAX_SAMPLES = 100_000
MAX_SEED = 2**32 - 1  # what every random generator takes (torch.manual_seed, numpy), with room for derived seeds


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="Hugging Face model folder; None = the embedded SmolLM2-135M")
    gguf_file: str | None = Field(None, description="a GGUF file inside `path` (or a full path) to dequantize")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: DeviceName = Field("auto", description="work device: auto, cpu, cuda[:i], npu[:i]")
    trust_remote_code: bool = False
    lazy: bool = Field(False, description="read a safetensors checkpoint one decoder layer at a time and write the "
                                          "output as it goes: neither model is ever whole in memory")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        kind = value.split(":", 1)[0]
        if kind not in ("auto", "cpu", "cuda", "npu"):
            raise ValueError(f"unknown device {value!r}: use auto, cpu, cuda[:index] or npu[:index]")
        return value


class CalibrationSpec(BaseModel):
    """Where calibration samples come from. `generate` needs no data: the model writes its own."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["generate", "texts", "text_file", "jsonl", "dataset"] = "generate"
    texts: list[str] | None = None
    path: str | None = Field(None, description="text_file / jsonl path")
    jsonl_field: str = "text"
    dataset: str | None = Field(None, description="a `datasets` name, e.g. wikitext")
    dataset_config: str | None = None
    split: str = "train"
    prompt: str = Field("", description="seed text for `generate` (empty = start from the BOS token)")
    num_samples: int = Field(32, gt=0, le=MAX_SAMPLES)
    seqlen: int = Field(512, gt=0)
    seed: int = Field(0, ge=0, le=MAX_SEED, description="0 to 2**32 - 1")

    @model_validator(mode="after")
    def _source_has_its_input(self) -> CalibrationSpec:
        needs = {"texts": "texts", "text_file": "path", "jsonl": "path", "dataset": "dataset"}
        field = needs.get(self.source)
        if field and not getattr(self, field):
            raise ValueError(f"calibration source '{self.source}' needs `{field}`")
        if self.source == "texts" and not any(t.strip() for t in self.texts or []):
            raise ValueError("calibration texts are empty")
        return self


class LayerOverride(BaseModel):
    """Mixed precision: Linears matching `targets` get another scheme or algorithm."""

    model_config = ConfigDict(extra="forbid")

    targets: list[str] = Field(..., min_length=1, description="exact names or 're:<regex>' patterns")
    scheme: PresetName | None = None
    weights: WeightArgs | None = None
    activations: ActArgs | None = None
    weight_only: bool = False
    algorithm: str | None = Field(None, description="the weight algorithm for these Linears")
    grid: str | None = Field(None, description="the plugin whose weight grid these Linears' codes are rounded onto "
                             "(a Grid plugin, as it would be named in algorithms), or 'uniform' for the integer grid; "
                             "default: the recipe's")


class RuntimeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    progress: bool = True
    check_finite: bool = True
    offload_layers: bool = Field(True, description="move each decoder layer back to CPU when done")
    error_samples: int = Field(4, gt=0, description="calibration samples on which layer errors are measured")
    batch_tokens: int = Field(2048, gt=0, description="tokens per calibration forward: samples of one length are "
                              "batched up to this many tokens (a sample longer than it runs alone)")
    calibration_dtype: Literal["auto", "model", "bfloat16", "float16"] = Field(
        "auto", description="what the calibration passes compute in: autocast to bfloat16 / float16, the model's own "
                            "dtype, or auto (bfloat16 for a float32 model on hardware with native bfloat16 when the "
                            "recipe is weight-only; see slimquant.runtime.precision)")
    checkpoint_dir: str | None = Field(None, description="write a resume checkpoint here after each decoder layer "
                                       "(see slimquant.runtime.checkpoint)")
    resume: bool = Field(False, description="continue from the checkpoint in checkpoint_dir, if there is one")
    keep_checkpoint: bool = Field(False, description="keep checkpoint_dir after a successful save")
    collective_timeout: float = Field(10.0, gt=0, le=7 * 24 * 60, description="several processes: minutes a process "
                                      "waits for the others in one exchange (including process 0's float evaluation "
                                      "before the first) before all stop")

    @model_validator(mode="after")
    def _resume_has_a_checkpoint(self) -> RuntimeSpec:
        if self.resume and not self.checkpoint_dir:
            raise ValueError("runtime.resume needs runtime.checkpoint_dir")
        return self


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = ModelSpec()
    calibration: CalibrationSpec = CalibrationSpec()
    scheme: PresetName | None = "W8A16"
    weights: WeightArgs | None = None
    activations: ActArgs | None = None
    weight_only: bool = False
    algorithms: list[dict[str, Any]] = Field(default_factory=list)
    ignore: list[str] = Field(default_factory=list, description="Linears left in float (msModelSlim disable_names)")
    overrides: list[LayerOverride] = Field(default_factory=list)
    kv_cache: KVCacheArgs | None = Field(None, description="quantize the attention cache's keys and values")
    budget: BudgetSpec | None = Field(None, description="mixed precision: a width per Linear chosen under a size "
                                                        "budget (see slimquant.budget)")
    runtime: RuntimeSpec = RuntimeSpec()

    @field_validator("algorithms", mode="before")
    @classmethod
    def _names_to_dicts(cls, value):
        if not isinstance(value, list):
            raise ValueError("algorithms must be a list of names or {name: ..., <arguments>} mappings")
        out = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise ValueError(f"algorithms[{i}] needs a `name`")
            out.append(item)
        names = [a["name"] for a in out]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"algorithm(s) named twice: {', '.join(dup)}")
        return out

    @model_validator(mode="after")
    def _has_a_scheme(self) -> Recipe:
        if self.scheme is None and self.weights is None:
            raise ValueError("give a `scheme` preset or explicit `weights` arguments")
        return self

    @model_validator(mode="after")
    def _budget_chooses_the_weights(self) -> Recipe:
        if self.budget is None:
            return self
        for i, override in enumerate(self.overrides):
            if override.weights is not None or override.scheme is not None:
                raise ValueError(f"overrides[{i}] sets weights or a scheme, but `budget` chooses every Linear's "
                                 "weights; leave such a Linear out with `ignore`, or give the override only an "
                                 "algorithm")
        return self

    @model_validator(mode="after")
    def _explicit_arguments_fit_their_presets(self) -> Recipe:
        """Each explicit weights / activations block, merged field by field with its preset, is a valid scheme."""
        from slimquant.runtime.plan import override_scheme

        base = self.base_scheme()
        for override in self.overrides:
            override_scheme(base, override)
        return self

    def base_scheme(self) -> Scheme:
        preset = PRESETS[self.scheme] if self.scheme else None
        weights = merge_args(self.weights, preset.weights if preset else None)
        activations = merge_args(self.activations, preset.activations if preset else None)
        if self.weight_only:
            activations = None
        return Scheme(weights=weights, activations=activations)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from exc
        kind = "JSON" if path.suffix == ".json" else "YAML"
        try:
            data = load_json(text) if path.suffix == ".json" else yaml.load(text, Loader=UniqueKeyLoader)
        except (json.JSONDecodeError, yaml.YAMLError, DuplicateKeyError) as exc:
            raise RecipeError(f"recipe {path} is not valid {kind}: {one_line(str(exc))}") from None
        except RecursionError:
            raise RecipeError(f"recipe {path}: the {kind} is nested too deeply") from None
        return cls.parse(data or {}, source=str(path))

    @classmethod
    def parse(cls, data: dict, source: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(format_validation_error(exc, source)) from None
        except RecursionError:
            raise RecipeError(f"{source}: the recipe is nested too deeply") from None

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line: the source, then each problem with the field it is in, separated by '; '."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling)"
        problems.append(f"{where}: {one_line(msg)}")
    return f"{source}: {exc.error_count()} problem(s): " + "; ".join(problems)


def one_line(text: str) -> str:
    return " ".join(text.split())


class DuplicateKeyError(ValueError):
    """A recipe names the same key twice in one mapping (YAML and JSON would silently keep the last)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping, naming it and its line."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys given beside it override it
                continue
            key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                break  # the base class refuses it
            if key in seen:
                raise DuplicateKeyError(f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); "
                                        "keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    data = {}
    for key, value in pairs:
        if key in data:
            raise DuplicateKeyError(f"key {key!r} appears twice in one object; keep one")
        data[key] = value
    return data


def load_json(text: str):
    """json.loads that refuses a key given twice in one object."""
    return json.loads(text, object_pairs_hook=_unique_pairs)
