"""msModelSlim's outlier suppression: `AntiOutlier(model, calib_data, AntiOutlierConfig(...)).process()`.

process() rewrites the float model in place, layer by layer, without quantizing it (slimquant.smooth_only); the
user then quantizes with Calibrator(...).run() as usual. anti_method m1 = SmoothQuant, m2 = Shift (Outlier
Suppression+) then SmoothQuant. Other methods fail with a message naming them.
"""

from __future__ import annotations

import logging

from torch import nn

from slimquant.config.recipe import Recipe
from slimquant.errors import CalibrationError, RecipeError
from slimquant.runtime.pipeline import QuantizationReport

log = logging.getLogger(__name__)

NOT_PROVIDED = {"m3": "AWQ", "m4": "SmoothQuant with searched scales", "m5": "CBQ", "m6": "flex smooth"}


class AntiOutlierConfig:
    """msModelSlim's AntiOutlierConfig. `alpha` is SmoothQuant's migration strength; `smooth_all_linears` also
    smooths v_proj -> o_proj and up_proj -> down_proj, whose inputs carry the largest outliers of most LLMs."""

    def __init__(self, w_bit: int = 8, a_bit: int = 8, anti_method: str = "m2", dev_type: str = "cpu",
                 dev_id: int | None = None, w_sym: bool = True, alpha: float = 0.5, smooth_all_linears: bool = True,
                 flex_config: dict | None = None):
        method = str(anti_method).lower()
        if method in NOT_PROVIDED:
            raise RecipeError(f"AntiOutlierConfig: anti_method={anti_method!r} ({NOT_PROVIDED[method]}) is not "
                              "supported by slimquant; use 'm1' (SmoothQuant) or 'm2' (Shift + SmoothQuant)")
        if method not in ("m1", "m2"):
            raise RecipeError(f"AntiOutlierConfig: unknown anti_method {anti_method!r}; use 'm1' (SmoothQuant) or "
                              "'m2' (Shift + SmoothQuant)")
        if a_bit != 8:
            raise RecipeError(f"AntiOutlierConfig: anti_method {method} smooths activations for a_bit=8, got "
                              f"a_bit={a_bit}; weight-only (a_bit=16) needs m3 (AWQ), which slimquant lacks")
        if flex_config is not None:
            raise RecipeError("AntiOutlierConfig: flex_config belongs to m6 (flex smooth), not supported")
        if dev_type not in ("cpu", "npu", "cuda"):
            raise RecipeError(f"AntiOutlierConfig: dev_type must be cpu, npu or cuda, got {dev_type!r}")
        if not 0.0 <= alpha <= 1.0:
            raise RecipeError(f"AntiOutlierConfig: alpha must lie in [0, 1], got {alpha}")
        self.w_bit, self.a_bit, self.w_sym, self.anti_method = w_bit, a_bit, w_sym, method
        self.alpha, self.smooth_all_linears = alpha, smooth_all_linears
        self.device = dev_type if dev_id is None or dev_type == "cpu" else f"{dev_type}:{dev_id}"

    def to_recipe(self) -> Recipe:
        smoothers = [{"name": "smoothquant", "alpha": self.alpha, "smooth_all_linears": self.smooth_all_linears}]
        if self.anti_method == "m2":
            smoothers.insert(0, {"name": "shift", "shift_all_linears": self.smooth_all_linears})
        return Recipe.parse({"scheme": None, "weights": {"bits": self.w_bit, "symmetric": self.w_sym},
                             "activations": {"bits": 8}, "algorithms": smoothers,
                             "model": {"device": self.device}}, source="AntiOutlierConfig")


class AntiOutlier:
    """AntiOutlier(model, calib_data=..., cfg=...).process(): smooth `model` in place (it stays in float)."""

    def __init__(self, model: nn.Module, calib_data=None, cfg: AntiOutlierConfig | None = None,
                 norm_class_name: str | None = None, tokenizer=None, progress: bool = True):
        if calib_data is None or len(calib_data) == 0:
            raise CalibrationError("AntiOutlier needs calib_data: outlier suppression measures activations")
        if norm_class_name is not None:
            log.info("AntiOutlier: norm_class_name=%r is not needed, norms are found by tracing", norm_class_name)
        self.model, self.calib_data, self.tokenizer = model, calib_data, tokenizer
        self.cfg = cfg or AntiOutlierConfig()
        self.recipe = self.cfg.to_recipe()
        self.recipe.runtime.progress = progress
        self.report: QuantizationReport | None = None

    def process(self) -> QuantizationReport:
        from slimquant.api import smooth_only

        self.report = smooth_only(self.model, self.recipe, tokenizer=self.tokenizer, calib_data=self.calib_data)
        return self.report
