"""The contract (version 3) between slimquant's runtime and its plugins: the hooks.

Two entry-point groups, each name unique within its group:

- ``slimquant.plugins``: algorithms (``minmax``, ``gptq``, ``smoothquant``, ...), named in a recipe's
  ``algorithms``;
- ``slimquant.exporters``: output formats (``safe_tensor``, ``numpy``, ...), named in ``save_type`` /
  ``--save-type``.

A plugin imports from slimquant only ``slimquant.sdk``: ``hookimpl``, the role bases, the plan, weight and grid
types, the math API, statistics, errors, exporter helpers and the testing kit; CI enforces it with import-linter
(the contracts in the root ``pyproject.toml``). This module specifies the hooks it implements.

A plugin is a class that subclasses the base of each role it takes (``slimquant.roles``: ``WeightQuantizer``,
``ActivationQuantizer``, ``Smoother``, ``Grid``, ``CacheQuantizer``, ``ModelTransform``, ``Exporter``), with:

- ``name``: what users write; it must equal the entry-point name;
- ``Config``: a pydantic model of its arguments, with ``name: Literal["<name>"]`` and
  ``model_config = ConfigDict(extra="forbid")``; ``__init__(self, config)`` takes the validated ``Config``. The
  runtime refuses keys the Config does not declare whatever its setting, and ``check_plugin`` requires
  ``extra="forbid"``;
- the hook of each role it takes, and any of the role's optional hooks, marked with ``@hookimpl``; every algorithm
  named in ``algorithms`` must get a role in the plan;
- its capabilities, typed class attributes of its roles (``requires_calibration_data``, ``sequential``,
  ``accepts_weight_grid``, ``distributed``, ``row_parallel``, ``observes_output``, ``holds``, ``scale_dtype``, ...)
  and methods (``observes(plan)``, ``output_features(plan)``, ``linear_cost(rows, cols)``), documented in
  ``slimquant.roles`` and validated when the plugin loads.

What an output holds beyond plain uniform codes (permuted groups, a codebook, fractional zeros, two-level or
quantized scales, sparsity, outliers, a quantized cache, online transforms) is declared as ``Feature``s
(``slimquant.features``): producers say which their output has per plan, exporters and grids which they hold, and
the core refuses each mismatch at plan time.

What changed from version 2: roles are base classes instead of whatever hooks a class has; capabilities are typed
and validated at load (``observes_output`` now defaults to False); ``permutes_groups``, ``groups_from_sweep`` and
``holds_kv_cache`` became output features (``LinearPlan.features``, ``Exporter.holds``), so exporters and grids no
longer list other plugins' settings to refuse; the ``transform_model`` hook and the ``ModelTransform`` role are
new.

Weight grids: a ``Grid`` plugin may define the values a weight's codes stand for (a codebook such as NF4, with its way
of choosing each group's scale) through ``weight_grid``. When a recipe names two weight algorithms and exactly one of
them provides ``weight_grid``, that one is the plan's grid provider (``LinearPlan.grid_algorithm``) and the other
chooses the codes on its grid (``[nf4, gptq]``: GPTQ's error feedback, NF4's format); the one that chooses must
declare ``accepts_weight_grid``, and what it produces must be among the grid's ``holds``. A grid provider named alone
both provides the grid and quantizes. Without a grid provider a plan has ``grid_algorithm`` None and every algorithm
rounds onto the uniform integer grid. An override (``LayerOverride.grid``) gives its Linears another grid provider, or
the uniform grid ("uniform"), so that one recipe mixes grids (llama.cpp's Q4_K_M: Q5_0 blocks and K-quant super-
blocks, GPTQ choosing every code).

Attention cache: a recipe's ``kv_cache`` section (``slimquant.config.kv_cache.KVCacheArgs``: ``bits``, ``strategy``
head | tensor | channel | token, ``symmetric``, ``dynamic``, ``algorithm``) plans the plugin named by its
``algorithm`` (default: the cache algorithm the recipe names, else the one installed) as the run's cache algorithm
(``AlgorithmPlan.cache_algorithm``); it must implement ``quantize_cache``. Keys (after the rotary embedding, before
grouped-query heads are repeated) and values enter the cache fake-quantized, through the attention wrapper the runtime
installs (``slimquant.runtime.kv_attention``). Per decoder layer, after its Linears are quantized, a static cache's
observation pass shows the plugin every calibration batch's keys and values (``observe_cache``), then
``quantize_cache`` returns the layer's ``CacheQParams``; the layer's output for the next layer is computed with the
quantized cache. Its ``check`` is called with a ``CachePlan`` (``slimquant.plugins``) as ``plan``: once before the
model is loaded (``name``/``shape`` None), then per attention layer with the attention module's name and ``(kv_heads,
head_dim)``.

An exporter declares the ``Feature``s it holds (``holds``; ``KV_CACHE`` for a quantized attention cache) and the
float type its scales are stored in (``scale_dtype``). Everything else it cannot hold (bits, shapes, activation
schemes) it refuses in ``check`` and again in ``export`` (an output converted with ``slimquant export`` was never
planned for it); features it does not hold the core refuses for it, at plan time and again before ``export``.

Dispatch: the runtime calls each hook on the one plugin the plan chose for that call (the Linear's weight
algorithm, its activation algorithm, the smoother whose turn it is, the exporter of that format), with keyword
arguments only, through pluggy's subset callers. A plugin never sees another plugin's calls and needs no "is this
mine?" test. Every hook is optional.

State: ``ctx.state(self.name)`` is a dict private to the plugin for the current decoder layer. It lives from the
layer's first observation pass until the layer is done (after its last Linear is quantized and its output is fed
to the next layer); it is kept across the layer's smoothing pass, its sequential groups and its quantize pass, so
a plugin pops what it has consumed (GPTQ pops each Linear's Hessian). Statistics kept there should be
``slimquant.stats.Statistic`` objects, which declare how they combine across processes (sums add, ranges take
min/max, samples concatenate). Plugins never register torch hooks themselves: the runtime owns them.

Errors: a hook raises ``slimquant.errors.RecipeError`` for a bad combination of arguments (better caught in
``check``) and ``CalibrationError`` for unusable data. These, ``OSError`` and out-of-memory errors reach the user
unchanged. Any other exception raised inside a hook is a plugin bug: the runtime raises it again as ``PluginError:
plugin 'X' failed in <hook> on <Linear>: <Type>: <msg>``, with the original as ``__cause__``. What a hook returns is
validated when the runtime receives it, a ``QuantizedWeight`` changed after it was built included: a wrong type,
shape, dtype or range is a ``PluginError`` naming the plugin and the Linear.
"""

from __future__ import annotations

import pluggy

PROJECT = "slimquant"
CONTRACT_VERSION = 3

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def check(plan, name: str | None, shape: tuple[int, int] | None) -> list[str] | None:
    """Plan-time validation: return the problems (as strings naming the field, e.g. ``"weights.strategy: gptq
    quantizes per channel or per group, not per tensor"``) this plugin has with one ``LinearPlan``; None or [] when
    there are none.

    Called on every plugin a plan names (its weight and activation algorithms, each smoother, each exporter):
    first before any model is loaded, once per distinct scheme of the recipe (the base scheme and each override),
    with ``name`` and ``shape`` None; then, once the model's structure is known and before any calibration runs,
    once per quantized Linear with its full ``name`` and weight ``shape`` ``(out_features, in_features)``. The
    runtime raises one ``RecipeError`` listing every problem. Must not modify anything.
    """


@hookspec
def observe(ctx, name: str, module, inputs, output) -> None:
    """Called on each calibration batch for a Linear of the current decoder layer, with the Linear's input tensor
    ``inputs`` (``[..., in_features]``) and its output (None, before the Linear runs, for plugins that declare
    ``observes_output = False``).

    In a smoothing pass (``ctx.phase == "smooth"``) only the smoother whose turn it is observes, every quantized
    Linear of the layer. In the quantize pass (``ctx.phase == "quantize"``) the plugins named by that Linear's plan
    (weight and activation algorithm) observe it when their ``observes(plan)`` says so. Accumulate into
    ``ctx.state(self.name)``; return nothing; do not modify the tensors.

    When the passes compute in half precision (``runtime.calibration_dtype``, see slimquant.runtime.precision),
    ``inputs`` is in that dtype (what the Linear multiplies) although the model is float32, one tensor for Linears
    that read one input; the hook runs with autocast off, as every other hook does, so statistics accumulate in
    whatever dtype the plugin chooses.
    """


@hookspec
def smooth(ctx) -> None:
    """Called once per decoder layer on each smoother, in recipe order, right after that smoother's own observation
    pass over the layer as the previous smoothers left it.

    Rewrite norms and Linears of ``ctx.layer`` so that the layer's float output is unchanged up to float rounding
    (SmoothQuant, Shift, AWQ scaling); ``ctx.subgraphs`` lists which norm or Linear feeds which Linears,
    ``ctx.block_inputs`` / ``ctx.run_block`` give a sub-block's calibration inputs and outputs. A smoother may also
    change weights on purpose to help the quantizer that follows (AWQ's clipping), and then says so in its docs:
    whatever weight algorithm the plan names quantizes the weights as the smoothers leave them. Return nothing.
    """


@hookspec(firstresult=True)
def quantize_weight(ctx, name: str, module, args):
    """Quantize one Linear's weight with ``args`` (a ``WeightArgs``), on the plugin the Linear's plan names.

    Return a ``slimquant.quant.QuantizedWeight`` of the Linear's shape. The float weight is still in place; the
    runtime swaps the Linear for a ``FakeQuantLinear`` afterwards. Called once per quantized Linear, after the
    observation pass of its sequential group.
    """


@hookspec(firstresult=True)
def weight_grid(args):
    """The grid (a ``slimquant.quant.grid.WeightGrid``) that weights with ``args`` (a ``WeightArgs``) are rounded
    onto, on the plugin a Linear's plan names as its ``grid_algorithm``; None for the uniform integer grid.

    The grid chooses each group's scale from the group's weights (``qparams``), how the scales are stored
    (``quantize_scales``: float32, or rounded, e.g. double-quantized), and the value of each code
    (``quantize`` / ``dequantize``, ``codebook``). Weight algorithms get it through ``ctx.grid(name)`` (built once
    per distinct ``args`` and cached) and return a ``QuantizedWeight`` on it: the runtime refuses one whose codebook
    differs from the grid's. ``WeightGrid``'s docstring says which of its methods the weight algorithms call, when,
    and the code and zero-point conventions. Refuse arguments the grid cannot hold (``weights.bits``) in ``check``:
    the runtime calls ``check`` on the grid provider of every plan too. Must not modify anything.
    """


@hookspec(firstresult=True)
def quantize_act(ctx, name: str, module, args):
    """Return the ``ActQParams`` for one Linear's input (``args`` is an ``ActArgs``), on the plugin the Linear's plan
    names for activations. Called right after the Linear's weight was quantized (``ctx.qweights[name]``)."""


@hookspec
def observe_cache(ctx, layer_index: int, keys, values) -> None:
    """Called on each calibration batch of decoder layer ``layer_index`` (a static cache only), on the cache
    algorithm, with the attention's ``keys`` (after RoPE) and ``values`` as they would enter the cache, float
    ``[batch, kv_heads, seq, head_dim]``, computed by the layer with its Linears already quantized. Accumulate into
    ``ctx.state(self.name)``; return nothing; do not modify the tensors."""


@hookspec(firstresult=True)
def quantize_cache(ctx, layer_index: int, args):
    """Return the ``slimquant.quant.cache_params.CacheQParams`` of decoder layer ``layer_index``'s cache (``args`` is
    the recipe's ``KVCacheArgs``), on the cache algorithm, after its observation pass (none for a dynamic cache):
    static scales ``[kv_heads, head_dim]`` (per-head and per-tensor scales repeated over what they span), or
    ``dynamic=True`` without tensors. The runtime refuses a result whose bits, symmetry, dynamic flag or shape
    differ from ``args`` and the layer's attention."""


@hookspec(firstresult=True)
def export(model, output_dir, options: dict):
    """Write ``model`` (after quantization) into ``output_dir``, on the exporter of the format asked for.

    ``output_dir`` is a fresh temporary directory that the caller renames into place when every format has been
    written. Each quantized Linear of ``model`` is a ``FakeQuantLinear``; its ``qweight`` holds the codes and
    scales. ``options`` holds ``part_file_size`` (GiB per shard, 0: one file), ``linear_types`` (each Linear's name
    to its scheme's type name, ``"W8A8"``, ..., ``"FLOAT"`` when left in float; None when not known) and
    ``pack_int4`` (two 4-bit codes per byte where the format allows). Return the list of files written. Refuse
    what the format cannot hold in ``check``, before any work, never by writing an approximation. Write only under
    ``output_dir``: ``save_quantized`` removes anything the exporter creates beside it and reports it as a
    ``PluginError``.
    """


@hookspec
def check_model(ctx) -> list[str] | None:
    """Plan-time validation of a ``ModelTransform`` or an ``Exporter`` against the model's structure (its
    architecture, norms, shapes): the problems, each naming the module or config field (``"model.layers.0.
    input_layernorm: a norm with a bias cannot be folded into a rotation"``, ``"the model is a 'gemma' model; ..."``),
    that keep a transform from rewriting the model exactly or a format from holding it; None or [] when there are
    none.

    Called with a ``ModelContext`` before any weight is read, on a weightless copy of the model (parameters on the
    meta device: read module types, shapes and the config, not values), and again on the loaded model before any
    work. Must not modify anything.
    """


@hookspec
def transform_model(ctx) -> None:
    """Rewrite the whole model once, on a ``ModelTransform``, before anything else touches it: after the model is
    loaded and every Linear planned, before calibration inputs are caught and before the first decoder layer is
    smoothed or quantized (on the data-free path too).

    ``ctx`` is a ``ModelContext`` (``slimquant.runtime.model_context``): ``ctx.model``, its decoder layers
    (``ctx.layers``, under ``ctx.prefix``), each Linear's ``LinearPlan`` (``ctx.plans``, None for one left in float),
    the work device, and the calibration batches (``ctx.samples``, None on the data-free path) for a transform that
    measures what its rewrite does to the quantizer that follows. Transforms run in recipe order. A transform must
    leave the float model's function unchanged up to float rounding (a rotation folded into the weights, an untied
    embedding), may change any weight, add or untie parameters, but must not add, remove or rename Linears (the plans
    name them); it says what it did through ``ctx.note(...)``, which the run's report and plan print. Return nothing.
    """
