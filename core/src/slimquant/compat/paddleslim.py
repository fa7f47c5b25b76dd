"""PaddleSlim's outlier-suppression calls, on slimquant's smoothing plugins:

    smooth = Smooth(model, model_config=None, alpha=0.5, smooth_all_linears=False,
                    sample_function=MultiStepSampler(), search_function=PieceWiseSearch(k_piece=3))
    for batch in data:
        model(batch)
        smooth.step += 1
    smooth.update_weight()

While the user runs data through the model, hooks hand every quantizable Linear's input to the plugin's `observe`
(and keep each decoder layer's first inputs, on which the rewrite is checked); update_weight() removes the hooks
and calls the plugin's `smooth` layer by layer. Structure is traced, so `model_config` is optional: only its
skip lists are used.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from slimquant.compat.aliases import plugin_for
from slimquant.config.recipe import Recipe
from slimquant.errors import CalibrationError, RecipeError
from slimquant.model.structure import find_decoder_layers, float_module_names, layer_linears, normalize_linears
from slimquant.plugins import plan_algorithms
from slimquant.runtime.context import LayerContext
from slimquant.runtime.layer_inputs import NotReplayable, stateless_input
from slimquant.runtime.plan import plan_linears

log = logging.getLogger(__name__)

MODEL_CONFIG_KEYS = {"fused_qkv", "linear_flag", "norm_flag", "parallel_ffn", "skip_norm_list", "skip_linear_list"}


class MultiStepSampler:
    """Activation ranges over all batches (the running maximum)."""

    sampler, decay = "max", 0.98


class EMASampler:
    """Activation ranges as a bias-corrected moving average of each batch's extremes."""

    sampler = "ema"

    def __init__(self, ema_beta: float = 0.98):
        self.decay = ema_beta


def mse_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).mean()


class PieceWiseSearch:
    """Search arguments for Smooth(search_function=...): runs the plugin declaring PaddleSlim's PieceWiseSearch."""

    def __init__(self, k_piece: int = 1, bits_length: int = 8, search_piece: bool = False,
                 search_alpha_min: float = 0.2, search_alpha_max: float = 0.8, search_scale_min: float = 1.0,
                 search_scale_max: float = 5.0, weight_quant_method: str = "abs_max_channel_wise",
                 act_quant_method: str = "abs_max", use_clip: bool = False, search_clip: bool = False,
                 loss_function=mse_loss, **extra):
        if use_clip or search_clip:
            raise RecipeError("PieceWiseSearch: use_clip / search_clip are not supported by slimquant")
        if loss_function is not mse_loss:
            raise RecipeError("PieceWiseSearch: only loss_function=mse_loss is supported")
        self.args = {"k_piece": k_piece, "bits_length": bits_length, "search_piece": search_piece,
                     "search_alpha_min": search_alpha_min, "search_alpha_max": search_alpha_max,
                     "search_scale_min": search_scale_min, "search_scale_max": search_scale_max,
                     "weight_quant_method": weight_quant_method, "act_quant_method": act_quant_method, **extra}


def _sampler_args(sample_function) -> dict:
    if sample_function is None:
        return {}
    if not isinstance(sample_function, (MultiStepSampler, EMASampler)):
        raise RecipeError(f"sample_function must be MultiStepSampler() or EMASampler(), got {sample_function!r}")
    return {"sampler": sample_function.sampler, "ema_decay": sample_function.decay}


def _skips(model_config: dict | None) -> list[str]:
    model_config = dict(model_config or {})
    unknown = sorted(set(model_config) - MODEL_CONFIG_KEYS)
    if unknown:
        raise RecipeError(f"model_config: unknown key(s) {unknown}; known: {sorted(MODEL_CONFIG_KEYS)}")
    return list(model_config.get("skip_norm_list", [])) + list(model_config.get("skip_linear_list", []))


class _HookedSmoothing:
    """Observe while the user runs the model; rewrite on update_weight()."""

    def __init__(self, model: nn.Module, algorithm: dict):
        self.model, self.step = model, 0
        recipe = Recipe.parse({"scheme": "W8A8", "algorithms": [algorithm]}, source=type(self).__name__)
        plan = plan_algorithms(recipe)
        self.plugins, self.algorithm = plan.plugins, algorithm["name"]
        normalize_linears(model)
        prefix, layers = find_decoder_layers(model)
        per_layer = [layer_linears(layer, f"{prefix}.{i}") for i, layer in enumerate(layers)]
        plans = plan_linears(recipe, plan, [n for lin in per_layer for n in lin], float_module_names(model))
        self.contexts, self.handles = [], []
        for i, (layer, linears) in enumerate(zip(layers, per_layer, strict=True)):
            device = next(layer.parameters()).device
            ctx = LayerContext(i, f"{prefix}.{i}", layer, device, linears, {n: plans[n] for n in linears}, [])
            self.contexts.append(ctx)
            self.handles.append(layer.register_forward_pre_hook(self._keep_inputs(ctx), with_kwargs=True))
            for name in ctx.quantized_names():
                self.handles.append(ctx.module(name).register_forward_hook(self._observe(ctx, name)))

    @staticmethod
    def _keep_inputs(ctx):
        def hook(module, args, kwargs):
            if not ctx.inputs:
                try:
                    ctx.inputs.append(stateless_input(args, kwargs))
                except NotReplayable as exc:  # a generation step: keep the next full forward instead
                    log.debug("%s: not keeping a layer call to replay: %s", ctx.prefix, exc)
        return hook

    def _observe(self, ctx, name):
        def hook(module, inputs, output):
            self.plugins.call(self.algorithm, "observe", ctx=ctx, name=name, module=module,
                              inputs=inputs[0].detach(), output=output)
        return hook

    @torch.no_grad()
    def update_weight(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        if not self.contexts or not self.contexts[0].inputs:
            raise CalibrationError(f"{type(self).__name__}.update_weight(): no data went through the model yet")
        for ctx in self.contexts:
            ctx.phase = "smooth"
            self.plugins.call(self.algorithm, "smooth", ctx=ctx)
            ctx.clear_state()
            ctx.inputs.clear()


class Smooth(_HookedSmoothing):
    """SmoothQuant (alpha), or PaddleSlim's piecewise search when `search_function=PieceWiseSearch(...)`."""

    def __init__(self, model: nn.Module, model_config: dict | None = None, alpha: float = 0.5,
                 smooth_all_linears: bool = False, sample_function=None, search_function=None):
        common = {"smooth_all_linears": smooth_all_linears, "skip": _skips(model_config),
                  **_sampler_args(sample_function)}
        if search_function is None:
            algorithm = {"name": plugin_for("paddleslim", "Smooth", "Smooth"), "alpha": alpha, **common}
        elif isinstance(search_function, PieceWiseSearch):
            name = plugin_for("paddleslim", "PieceWiseSearch", "Smooth(search_function=PieceWiseSearch())")
            algorithm = {"name": name, **search_function.args, **common}
        else:
            raise RecipeError(f"search_function must be PieceWiseSearch(...) or None, got {search_function!r}")
        super().__init__(model, algorithm)


class Shift(_HookedSmoothing):
    """Outlier Suppression+ channel shifting."""

    def __init__(self, model: nn.Module, model_config: dict | None = None, shift_all_linears: bool = False,
                 sample_function=None):
        name = plugin_for("paddleslim", "Shift", "Shift")
        super().__init__(model, {"name": name, "shift_all_linears": shift_all_linears,
                                 "skip": _skips(model_config), **_sampler_args(sample_function)})
