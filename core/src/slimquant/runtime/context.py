"""What a plugin sees of the decoder layer being quantized."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import nn

from slimquant.model.subgraphs import LayerTrace, Subgraph, linear_pairs, trace_layer
from slimquant.quant.qweight import QuantizedWeight
from slimquant.runtime.layer_inputs import batch_size, leading_samples, stateless_input
from slimquant.runtime.plan import LinearPlan

LayerInput = tuple[tuple, dict]  # the (args, kwargs) the decoder layer was called with


class _BlockReached(Exception):
    """Stops the layer's forward once the sub-block asked for has received its input."""


def hidden_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def hidden_of_input(inp: LayerInput) -> torch.Tensor:
    args, kwargs = inp
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(inp: LayerInput, hidden: torch.Tensor) -> LayerInput:
    args, kwargs = inp
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@dataclass
class LayerContext:
    """``ctx``: the decoder layer being quantized, as the hooks ``observe``, ``smooth``, ``quantize_weight``,
    ``quantize_act``, ``observe_cache`` and ``quantize_cache`` see it. The runtime builds one per layer; a plugin
    reads it, keeps its statistics in ``state``, and never registers torch hooks itself.

    Attributes (set by the runtime, read-only for plugins):

    - ``index``: the layer's position among the decoder layers; ``prefix``: its module name (``"model.layers.3"``);
    - ``layer``: the decoder layer module (a smoother rewrites its norms and Linears in place); ``device``: where it
      runs;
    - ``linears``: its quantizable Linears by full model name; ``plans``: each one's ``LinearPlan`` (None: stays in
      float); ``inputs``: the layer's calibration inputs, a list of ``(args, kwargs)`` batches (empty on the
      data-free path);
    - ``phase``: ``"smooth"`` during a smoother's observation pass and ``smooth``, ``"quantize"`` during the quantize
      pass and ``quantize_weight`` / ``quantize_act``;
    - ``qweights``: the ``QuantizedWeight`` of each Linear quantized so far (``quantize_act`` reads its own);
    - ``grid_of``, ``precision``, ``row_blocks``: the runtime's callbacks behind ``grid``, the calibration
      precision of ``block_inputs`` / ``linear_inputs`` / ``run_block``, and ``row_block``.

    Methods and properties:

    - ``state(plugin)``: the plugin's private dict for this layer (pass ``self.name``), kept across the layer's
      passes and freed when it is done; statistics there are ``Statistic`` objects. ``clear_state()`` is the
      runtime's;
    - ``plan(name)``: a Linear's ``LinearPlan`` or None; ``module(name)``: a sub-module by full model name;
      ``quantized_names()``: the Linears with a plan; ``siblings(name)``: the same Linear in the other experts of an
      MoE block;
    - ``grid(name)``: the ``WeightGrid`` a Linear's codes are rounded onto (its plan's ``grid_algorithm``, or the
      two-level grid of ``weights.channel_bits``), built once per distinct ``WeightArgs``; None for the uniform
      integer grid;
    - ``row_block(name)``: the slice of output rows a ``row_parallel`` plugin's ``quantize_weight`` quantizes;
    - ``run_layer(inputs=None)``: the layer's hidden-state outputs on ``inputs`` (default: all calibration inputs);
    - ``leading_inputs(samples)``: the inputs holding the first ``samples`` samples; ``batches_covering(samples)``:
      how many leading batches hold them;
    - ``block_inputs(block, samples=None)`` / ``run_block(block, inputs)``: the ``(args, kwargs)`` a sub-block
      (``"self_attn"``, ``"mlp"``, or a full name) receives, and its outputs on them, for searches that compare
      a sub-block's output before and after a change (AWQ);
    - ``linear_inputs(names, samples=None, max_tokens=None)``: the input rows ``[tokens, in_features]`` of each
      Linear from one run of the layer;
    - ``subgraphs``: a smoother's units, each a ``source`` norm or Linear, its ``kind`` (``"norm"``, ``"attention"``
      for v -> o, ``"gated"`` for up -> down), the ``targets`` Linears it feeds and ``extra`` float modules reading
      the same output (MoE routers); ``trace``: the traced layer they come from (``groups``: its Linears in call
      order, one input tensor per group).
    """

    index: int
    prefix: str  # "model.layers.3"
    layer: nn.Module
    device: torch.device
    linears: dict[str, nn.Linear]  # quantizable Linears of this layer, by full model name
    plans: dict[str, LinearPlan | None]
    inputs: list[LayerInput]
    phase: str = "smooth"
    qweights: dict[str, QuantizedWeight] = field(default_factory=dict)
    _state: dict[str, dict] = field(default_factory=dict)
    _trace: LayerTrace | None = None
    grid_of: Callable[[LinearPlan], object] | None = None  # the runtime's: a plan's WeightGrid from its provider
    # the calibration passes' precision (slimquant.runtime.precision), also for block_inputs, linear_inputs, run_block
    precision: Callable[[], AbstractContextManager] = contextlib.nullcontext
    # the runtime's: which rows of a Linear this process quantizes (all of them unless several processes split it)
    row_blocks: Callable[[str, int], slice] | None = None

    def state(self, plugin: str) -> dict:
        """A plugin's private store for this layer: kept across the layer's smoothing, observation and quantize
        passes, freed when the layer is done (see slimquant.hookspecs)."""
        return self._state.setdefault(plugin, {})

    def clear_state(self) -> None:
        self._state.clear()

    def row_block(self, name: str) -> slice:
        """The rows of Linear `name` a row_parallel plugin's quantize_weight quantizes and returns: all of them in a
        single process; this process's block when several split the Linear (slimquant.runtime.distributed)."""
        rows = self.module(name).out_features
        return slice(0, rows) if self.row_blocks is None else self.row_blocks(name, rows)

    def plan(self, name: str) -> LinearPlan | None:
        return self.plans.get(name)

    def grid(self, name: str):
        """The `slimquant.quant.grid.WeightGrid` the Linear's codes are rounded onto, from the plugin its plan names
        as grid provider; None for the uniform integer grid (see slimquant.hookspecs)."""
        plan = self.plans.get(name)
        if plan is None or (plan.grid_algorithm is None and not plan.scheme.weights.channel_bits):
            return None
        if self.grid_of is None:
            raise RuntimeError(f"{name}: its plan has a weight grid ({plan.grid_algorithm}), but this LayerContext "
                               "was built without the runtime's grid_of")
        return self.grid_of(plan)

    def module(self, name: str) -> nn.Module:
        return self.layer.get_submodule(name[len(self.prefix) + 1:])

    def quantized_names(self) -> list[str]:
        return [n for n, p in self.plans.items() if p is not None]

    @torch.no_grad()
    def run_layer(self, inputs: Iterable[LayerInput] | None = None) -> list[torch.Tensor]:
        """Run the layer (as it is now) on calibration inputs; returns its hidden-state outputs."""
        outs = []
        for args, kwargs in (self.inputs if inputs is None else inputs):
            outs.append(hidden_of(self.layer(*args, **kwargs)))
        return outs

    def batches_covering(self, samples: int) -> int:
        """How many leading calibration batches (`inputs`, several samples each) hold at least `samples` samples."""
        seen = 0
        for i, inp in enumerate(self.inputs):
            seen += batch_size(inp)
            if seen >= samples:
                return i + 1
        return len(self.inputs)

    def leading_inputs(self, samples: int | None) -> list[LayerInput]:
        """The calibration inputs holding the first `samples` samples (all when None), the last batch cut to fit."""
        if samples is None:
            return list(self.inputs)
        kept = []
        for inp in self.inputs:
            if samples <= 0:
                break
            kept.append(leading_samples(inp, samples))
            samples -= batch_size(inp)
        return kept

    @torch.no_grad()
    def block_inputs(self, block: str, samples: int | None = None) -> list[LayerInput]:
        """The (args, kwargs) the sub-module `block` (a name relative to the layer, e.g. "self_attn" or "mlp", or a
        full model name) receives on the layer's calibration inputs, as the layer is now. The layer stops at the
        block, so nothing after it runs. Only the first `samples` calibration samples are run (all when None)."""
        module = self._block(block)
        caught: list[LayerInput] = []

        def catch(mod, args, kwargs):
            caught.append(stateless_input(args, kwargs))
            raise _BlockReached

        handle = module.register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for inp in self.leading_inputs(samples):
                try:
                    with self.precision():
                        self.run_layer([inp])
                except _BlockReached:
                    pass
        finally:
            handle.remove()
        return caught

    @torch.no_grad()
    def linear_inputs(self, names: list[str], samples: int | None = None,
                      max_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """The input rows ``[tokens, in_features]`` that each Linear of `names` receives on the layer's calibration
        inputs, as the layer is now, from one run of the layer over the first `samples` samples. With `max_tokens`,
        at most that many rows per Linear, evenly spaced. A Linear that sees no token (an MoE expert the router never
        chose) is left out."""
        caught: dict[str, list[torch.Tensor]] = {name: [] for name in names}

        def make_hook(name):
            def catch(module, args):
                caught[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))
            return catch

        handles = [self.module(name).register_forward_pre_hook(make_hook(name)) for name in names]
        try:
            with self.precision():
                self.run_layer(self.leading_inputs(samples))
        finally:
            for handle in handles:
                handle.remove()
        rows = {}
        for name, parts in caught.items():
            x = torch.cat(parts) if parts else None
            if x is None or not x.shape[0]:
                continue
            if max_tokens is not None and x.shape[0] > max_tokens:
                x = x[torch.linspace(0, x.shape[0] - 1, max_tokens, device=x.device).long()]
            rows[name] = x
        return rows

    @torch.no_grad()
    def run_block(self, block: str, inputs: list[LayerInput]) -> list[torch.Tensor]:
        """Run the sub-module `block` on inputs from `block_inputs`; returns its first output per input (in the
        calibration passes' precision, like everything these helpers run: compare outputs with each other, not with
        a float32 value)."""
        module = self._block(block)
        with self.precision():
            return [hidden_of(module(*args, **kwargs)) for args, kwargs in inputs]

    def _block(self, block: str) -> nn.Module:
        """A sub-module by its name relative to the layer ("" is the layer) or by its full model name."""
        return self.module(block) if block.startswith(self.prefix + ".") else self.layer.get_submodule(block)

    @property
    def trace(self) -> LayerTrace:
        if self._trace is None:
            def run():  # one sample shows the structure (experts no token reached join their siblings)
                with self.precision():
                    self.run_layer(self.leading_inputs(1))
            self._trace = trace_layer(self.layer, self.prefix, self.linears, run)
        return self._trace

    @property
    def subgraphs(self) -> list[Subgraph]:
        """norm -> Linears (traced) followed by exact Linear -> Linear pairs (v -> o, up -> down)."""
        return self.trace.norm_subgraphs + linear_pairs(self.linears)

    def siblings(self, name: str) -> list[str]:
        """The same Linear in the other experts of an MoE block (empty outside MoE)."""
        if ".experts." not in name:
            return []
        key = re.sub(r"\.experts\.\d+\.", ".experts.*.", name)
        return [n for n in self.linears if n != name and re.sub(r"\.experts\.\d+\.", ".experts.*.", n) == key]
