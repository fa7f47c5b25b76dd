"""msModelSlim's outlier suppression: `AntiOutlier(model, calib_data, AntiOutlierConfig(...)).process()`.

process() rewrites the float model in place, layer by layer, without quantizing it (slimquant.smooth_only); the
user then quantizes with Calibrator(...).run() as usual. Each anti_method is the plugin declaring it in its
`aliases` (m1 SmoothQuant, m2 Shift (Outlier Suppression+) followed by m1, m3 AWQ); m4-m6 fail with a message
naming them, and a method whose plugin is not installed says which distribution to install.
"""

from __future__ import annotations

import logging

from torch import nn

from slimquant.compat.aliases import plugin_for
from slimquant.config.recipe import Recipe
from slimquant.errors import CalibrationError, RecipeError
from slimquant.plugins import load_plugin_class
from slimquant.runtime.pipeline import QuantizationReport

log = logging.getLogger(__name__)

NOT_PROVIDED = {"m4": "SmoothQuant with searched scales", "m5": "CBQ", "m6": "flex smooth"}
ALIAS = "msmodelslim.anti_method"


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
        if method not in ("m1", "m2", "m3"):
            raise RecipeError(f"AntiOutlierConfig: unknown anti_method {anti_method!r}; use 'm1' (SmoothQuant), "
                              "'m2' (Shift + SmoothQuant) or 'm3' (AWQ)")
        self.plugins = [plugin_for(ALIAS, method, "AntiOutlierConfig.anti_method")]
        if method == "m2":  # msModelSlim's m2 is its shift followed by m1's smoothing
            self.plugins.append(plugin_for(ALIAS, "m1", "AntiOutlierConfig.anti_method"))
        if a_bit != 8 and method != "m3":
            raise RecipeError(f"AntiOutlierConfig: anti_method {method} smooths activations for a_bit=8, got "
                              f"a_bit={a_bit}; weight-only (a_bit=16) takes m3 (AWQ)")
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
        """The plugins' own arguments: `alpha` and `smooth_all_linears` pass by name to the plugins whose Config
        has those fields (the shift plugin's `shift_all_linears` follows `smooth_all_linears`)."""
        offered = {"alpha": self.alpha, "smooth_all_linears": self.smooth_all_linears,
                   "shift_all_linears": self.smooth_all_linears}
        smoothers = []
        for name in self.plugins:
            fields = load_plugin_class(name).Config.model_fields
            smoothers.append({"name": name, **{k: v for k, v in offered.items() if k in fields}})
        data = {"scheme": None, "weights": {"bits": self.w_bit, "symmetric": self.w_sym},
                "algorithms": smoothers, "model": {"device": self.device}}
        if self.a_bit == 8:
            data["activations"] = {"bits": 8}
        return Recipe.parse(data, source="AntiOutlierConfig")


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
