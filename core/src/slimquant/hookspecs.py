"""The contract between slimquant's runtime and its algorithm plugins.

A plugin is a class found through the entry-point group ``slimquant.plugins``. It has:

- ``name``: the algorithm name users write in a recipe; it must equal the entry-point name;
- ``Config``: a pydantic model of its arguments, with ``name: Literal["<name>"]``;
- ``__init__(self, config)``: takes a validated ``Config``;
- any of the hooks below, marked with ``@hookimpl``;
- optionally ``observes(self, plan) -> bool``: whether its ``observe`` needs the quantize-phase pass over
  the calibration data for a Linear with that ``LinearPlan``. A plugin with an ``observe`` hook and no
  ``observes`` is assumed to need it; when no plugin needs it (round-to-nearest weight-only quantization),
  the runtime skips that pass.

The runtime calls every hook with keyword arguments only. Hooks that choose one plugin
(``quantize_weight``, ``quantize_act``, ``export``) pass that plugin's name as ``algorithm`` or
``fmt``; a plugin returns ``None`` when the name is not its own. Plugins keep their statistics in
``ctx.state(self.name)``, which the runtime frees after each decoder layer, and never register torch
hooks themselves: the runtime owns them.
"""

from __future__ import annotations

import pluggy

PROJECT = "slimquant"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def observe(ctx, name: str, module, inputs, output) -> None:
    """Called for every quantizable Linear of the current decoder layer on every calibration batch.

    ``inputs`` is the Linear's input tensor, ``output`` its output. ``ctx.phase`` is ``"smooth"`` in
    the pass before smoothing and ``"quantize"`` in the pass before quantization. Accumulate what you
    need in ``ctx.state(self.name)``; return nothing.
    """


@hookspec
def smooth(ctx, algorithm: str) -> None:
    """Called once per decoder layer for each smoother the recipe names, in recipe order, each right after its
    own observation pass (``ctx.phase == "smooth"``) over the layer as the previous smoothers left it.

    Rewrite norms and Linears of ``ctx.layer`` so that the layer's float output is unchanged up to float
    rounding (SmoothQuant, Shift, AWQ scaling). ``ctx.subgraphs`` lists which norm or Linear feeds which
    Linears. Return nothing.
    """


@hookspec(firstresult=True)
def quantize_weight(ctx, name: str, module, args, algorithm: str):
    """Quantize one Linear's weight with ``args`` (a WeightArgs) if ``algorithm`` is yours.

    Return a ``slimquant.quant.QuantizedWeight``; the runtime swaps the Linear for a fake-quantized one.
    The Linear's float weight is still in place when this is called.
    """


@hookspec(firstresult=True)
def quantize_act(ctx, name: str, module, args, algorithm: str):
    """Return the ``ActQParams`` for one Linear's input (``args`` is an ActArgs) if ``algorithm`` is yours."""


@hookspec(firstresult=True)
def export(model, output_dir, fmt: str, options: dict):
    """Write ``model`` (after quantization) to ``output_dir`` in format ``fmt`` if it is yours.

    ``output_dir`` is a fresh temporary directory that the caller renames into place when all formats
    have been written. Return the list of files written.
    """
