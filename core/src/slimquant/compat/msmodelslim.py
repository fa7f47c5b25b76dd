"""The msModelSlim calls users already know — QuantConfig, Calibrator(...).run() / .save() — on slimquant's recipe.

Arguments slimquant does not support fail with a message naming them; none is ignored silently.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence

import torch
from torch import nn

from slimquant.calibration import from_user_data, generate_samples
from slimquant.compat.aliases import plugin_for
from slimquant.config.recipe import Recipe
from slimquant.errors import RecipeError
from slimquant.plugins import DEFAULT_ALGORITHM
from slimquant.runtime.pipeline import QuantizationReport
from slimquant.runtime.plan import name_matches

log = logging.getLogger(__name__)

# msModelSlim options with no slimquant counterpart yet: (name, the value that means "off")
UNSUPPORTED = {
    "nonuniform": False, "do_smooth": False, "use_sigma": False, "use_kvcache_quant": False, "pr": 1.0,
}
# sparse quantization (W8A8S; is_lowbit: its low-bit form) goes to the plugin declaring aliases["msmodelslim.sparse"]
SPARSE_ALIAS = ("msmodelslim.sparse", "co_sparse")
LABEL_FREE_SAMPLES, LABEL_FREE_SEQLEN = 16, 256


class QuantConfig:
    """msModelSlim's QuantConfig. `to_recipe()` gives the equivalent slimquant recipe."""

    def __init__(self, w_bit: int = 8, a_bit: int = 8, disable_names: Sequence[str] | None = None,
                 dev_type: str = "cpu", dev_id: int | None = None, act_method: int = 1, w_sym: bool = True,
                 mm_tensor: bool = True, w_method: str = "MinMax", group_size: int = 0, is_dynamic: bool = False,
                 disable_last_linear: bool = True, open_outlier: bool = True, co_sparse: bool = False,
                 is_lowbit: bool = False, fraction: float | None = None, sigma_factor: float | None = None,
                 **unsupported):
        # msModelSlim's C8: int8 keys and values, static per-channel asymmetric scales (the kv_cache section)
        self.use_kvcache_quant = bool(unsupported.pop("use_kvcache_quant", False))
        for name, value in unsupported.items():
            if name not in UNSUPPORTED:
                raise RecipeError(f"QuantConfig: unknown argument {name!r}")
            if value != UNSUPPORTED[name]:
                raise RecipeError(f"QuantConfig: {name}={value!r} is not supported by slimquant yet")
        if a_bit not in (8, 16):
            raise RecipeError(f"QuantConfig: a_bit must be 8 or 16, got {a_bit}")
        method = plugin_for("msmodelslim.w_method", w_method, "QuantConfig.w_method")
        self.sparse = None
        if co_sparse or is_lowbit:
            where = "QuantConfig.is_lowbit" if is_lowbit else "QuantConfig.co_sparse"
            if method != DEFAULT_ALGORITHM:
                raise RecipeError(f"{where}: sparse quantization chooses its own weight method; leave w_method "
                                  f"at MinMax (got {w_method!r})")
            self.sparse = {"name": plugin_for(*SPARSE_ALIAS, where), "fraction": 0.01 if fraction is None else fraction,
                           "sigma_factor": 3.0 if sigma_factor is None else sigma_factor}  # msModelSlim's defaults
        elif fraction is not None or sigma_factor is not None:
            raise RecipeError("QuantConfig: fraction and sigma_factor apply to sparse quantization only "
                              "(co_sparse=True or is_lowbit=True)")
        if not disable_last_linear:
            raise RecipeError("QuantConfig: disable_last_linear=False (quantizing lm_head) is not supported yet")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
            raise RecipeError(f"QuantConfig: group_size must be an integer >= 0 (0 = per channel), got {group_size!r}")
        if dev_type not in ("cpu", "npu", "cuda"):
            raise RecipeError(f"QuantConfig: dev_type must be cpu, npu or cuda, got {dev_type!r}")
        self.w_bit, self.a_bit, self.w_sym, self.mm_tensor = w_bit, a_bit, w_sym, mm_tensor
        self.disable_names = list(disable_names or [])
        self.device = dev_type if dev_id is None or dev_type == "cpu" else f"{dev_type}:{dev_id}"
        self.act_method, self.w_method, self.group_size = act_method, method, group_size
        self.is_dynamic, self.open_outlier = is_dynamic, open_outlier

    def to_recipe(self) -> Recipe:
        weights: dict = {"bits": self.w_bit, "symmetric": self.w_sym}
        if self.group_size and self.group_size > 0:
            if self.a_bit != 16:
                raise RecipeError("QuantConfig: group_size applies to weight-only (a_bit=16) quantization")
            weights["group_size"] = self.group_size
        elif self.mm_tensor:
            weights["strategy"] = "tensor"
        data: dict = {"scheme": None, "weights": weights, "ignore": self.disable_names,
                      "model": {"device": self.device}}
        if self.a_bit == 8:
            data["activations"] = ({"bits": 8, "symmetric": True, "strategy": "token", "dynamic": True}
                                   if self.is_dynamic else {"bits": 8, "symmetric": False, "strategy": "tensor"})
        data["algorithms"] = [{"name": DEFAULT_ALGORITHM, "act_method": self.act_method}]
        if self.w_method != DEFAULT_ALGORITHM:
            data["algorithms"].append({"name": self.w_method})
        if self.sparse is not None:
            data["algorithms"].append(dict(self.sparse))
        if self.use_kvcache_quant:
            data["kv_cache"] = {"bits": 8, "strategy": "channel", "symmetric": False}
        return Recipe.parse(data, source="QuantConfig")


def _parse_disable_level(level: str) -> int:
    match = re.fullmatch(r"L(\d+)", str(level))
    if not match:
        raise RecipeError(f"disable_level must be 'L0', 'L1', ... (number of Linears to leave in float), got {level!r}")
    return int(match.group(1))


class Calibrator:
    """Calibrator(model, quant_config, calib_data, disable_level).run() quantizes `model` in place;
    `.save(output_dir, save_type=[...], part_file_size=...)` writes the msModelSlim layout.

    `disable_level='Ln'` leaves the n Linears with the largest quantization error in float; finding them
    takes one extra quantization pass on a copy of the model.
    """

    def __init__(self, model: nn.Module, quant_config: QuantConfig, calib_data=None, disable_level: str = "L0",
                 tokenizer=None, progress: bool = True):
        self.model = model
        self.config = quant_config
        self.recipe = quant_config.to_recipe()
        self.recipe.runtime.progress = progress
        self.disable_level = _parse_disable_level(disable_level)
        if self.disable_level:
            self._check_disable_level(self.recipe)
        self.samples = self._samples(calib_data, tokenizer)
        self.report: QuantizationReport | None = None
        self.auto_disabled: list[str] = []

    def _samples(self, calib_data, tokenizer) -> list[torch.Tensor]:
        if calib_data is not None and len(calib_data) > 0:
            return from_user_data(calib_data, tokenizer, self.recipe.calibration.seqlen)
        if calib_data is not None or self.recipe.base_scheme().activations is not None:
            from slimquant.errors import CalibrationError

            raise CalibrationError("calib_data is empty; give samples, or calib_data=None for label-free "
                                   "weight-only quantization (the model then calibrates on its own text)")
        return generate_samples(self.model, _BosTokenizer(self.model), LABEL_FREE_SAMPLES, LABEL_FREE_SEQLEN, 0)

    def run(self) -> QuantizationReport:
        from slimquant.api import quantize

        recipe = self.recipe
        if self.disable_level:
            probe = quantize(copy.deepcopy(self.model), recipe, samples=self.samples)
            worst = sorted(probe.linear_errors, key=probe.linear_errors.get, reverse=True)[: self.disable_level]
            self.auto_disabled = worst
            log.info("disable_level L%d: leaving in float %s", self.disable_level, ", ".join(worst))
            recipe = recipe.model_copy(update={"ignore": list(recipe.ignore) + worst})
        self.report = quantize(self.model, recipe, samples=self.samples)
        return self.report

    def _check_disable_level(self, recipe: Recipe) -> None:
        from slimquant.model.structure import all_quantizable_linears, normalize_linears

        normalize_linears(self.model)
        names = list(all_quantizable_linears(self.model))
        count = sum(1 for n in names if not any(name_matches(p, n) for p in recipe.ignore))
        if self.disable_level >= count:
            raise RecipeError(f"disable_level='L{self.disable_level}' would leave every one of the model's {count} "
                              f"quantizable Linears in float; use at most 'L{max(count - 1, 0)}'")

    def save(self, output_dir, save_type: str | Sequence[str] = ("numpy",), part_file_size: float | None = None,
             overwrite: bool = False) -> list:
        from slimquant.export import save_quantized

        if self.report is None:
            raise RecipeError("Calibrator.save() before run(): nothing is quantized yet")
        save_type = [save_type] if isinstance(save_type, str) else list(save_type)
        return save_quantized(self.model, output_dir, save_type=save_type, part_file_size=part_file_size or 0,
                              overwrite=overwrite, linear_types=self.report.linear_types())


class _BosTokenizer:
    """Just enough of a tokenizer for label-free generation: the model's own BOS/EOS ids."""

    def __init__(self, model):
        cfg = model.config
        self.bos_token_id = getattr(cfg, "bos_token_id", None)
        self.eos_token_id = getattr(cfg, "eos_token_id", None)
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = self.eos_token_id[0]
