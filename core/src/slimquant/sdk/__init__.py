"""The plugin SDK: everything a plugin imports from slimquant, and the only part of slimquant it may import.

CI enforces the boundary (import-linter's contracts in the root pyproject.toml, run by
tests/test_import_contracts.py): a plugin's own modules import ``slimquant.sdk`` and nothing else of the core, and
no other plugin. What a plugin author finds here, by role:

- hook markers: ``hookimpl`` marks a plugin's hooks, specified in ``slimquant.hookspecs``; ``CONTRACT_VERSION``;
- role bases, one per role a plugin takes, with its typed capabilities (``slimquant.roles``): ``WeightQuantizer``,
  ``ActivationQuantizer``, ``Smoother``, ``Grid``, ``CacheQuantizer``, ``ModelTransform``, ``Exporter`` (all
  ``Plugin``s); output features (``Feature``, ``features_of``): what a plan's output holds, declared by producers
  (``output_features(plan)``) and checked against what exporters and grids hold (``holds``);
- plan types, what the hooks are given: ``LinearPlan`` (a Linear's scheme and algorithms), ``CachePlan`` (what a
  cache algorithm's ``check`` sees), ``LayerContext`` (``ctx``), the recipe's arguments (``Scheme``,
  ``WeightArgs``, ``ActArgs``, ``Strategy``, ``KVCacheArgs``), ``name_matches`` for its Linear name patterns, and
  ``ModelContext`` (what a model transform's ``transform_model(ctx)`` is given);
- quantized-weight types and grids, what the hooks return: ``QuantizedWeight`` (with ``QuantizedScale``,
  ``TwoLevelScale`` and ``WeightOutliers``), ``ActQParams``, ``CacheQParams``, the grids ``WeightGrid`` and
  ``CodebookGrid``, ``FakeQuantLinear`` (what a quantized Linear becomes, as an exporter reads it) and the group
  helpers ``qrange``, ``effective_group_size``, ``num_groups``, ``contiguous_g_idx``;
- the math API: uniform quantization (``weight_qparams``, ``range_to_qparams``, ``round_to_nearest``,
  ``search_clip_ratio``, ...) and Hessians (``HessianAccumulator``, ``inverse_hessian_factor``, ...);
- statistics: ``Statistic`` and ``Reduce`` (how a statistic kept in ``ctx.state`` combines across processes) and
  the ``TokenSample`` observer;
- errors: ``RecipeError`` (arguments a plugin cannot take), ``CalibrationError`` (unusable data), ``OutputError``
  (a model a format cannot hold), under ``SlimquantError``;
- exporter helpers: a Hugging Face folder (``reference_model``, ``check_structure``, ``float_tensors``,
  ``model_dtype``, ``write_folder``), ``summarize`` for problems found on many Linears, slimquant's own output
  (``QuantizedFiles``, ``read_linear``), ``find_decoder_layers`` and ``SLIMQUANT_VERSION``;
- two namespaces: ``smoothing`` (the equivalent rewrites smoothers share) and ``kv_attention`` (an attention
  module's cache and its quantizers);
- testing: ``check_plugin`` and the tiny random models a plugin's tests run on.

Every name is a re-export: the core keeps its modules, which plugins do not import.

Writing a plugin
----------------

A plugin is a class that subclasses the role base of each role it takes (``class MyGrid(Grid, WeightQuantizer)``),
with ``name`` (its entry-point name), a pydantic ``Config`` (``name: Literal["<name>"]``,
``model_config = ConfigDict(extra="forbid")``), ``__init__(self, config)`` (the base's stores ``self.config``), the
hook of each role marked with ``@hookimpl`` (specified in ``slimquant.hookspecs``; keyword arguments only), and its
capabilities as typed class attributes (``slimquant.roles`` lists them; checked when the plugin loads). Each may add
``check(plan, name, shape)``: the problems it has with a ``LinearPlan`` (``plan.scheme.weights`` /
``.activations``), as strings naming the field: called before any model is loaded, then per Linear before any
calibration. The docstrings of the classes named below are their reference. By role:

- Weight algorithm (``WeightQuantizer``): ``quantize_weight(ctx, name, module, args)`` returns the ``QuantizedWeight``
  of ``module.weight`` (of its rows ``ctx.row_block(name)`` when ``row_parallel``) for ``args`` (``WeightArgs``):
  scales per row and group of ``effective_group_size(group_size, in_features)`` input channels (``group_size`` is
  ``args.group_size`` when ``args.strategy`` is ``"group"``, else None), codes signed in ``qrange(bits)``, each
  standing for ``(code - zero) * scale``. ``round_to_nearest``, ``weight_qparams``, ``search_clip_ratio`` and
  ``quantize_weight_with`` do the uniform math. Declaring ``accepts_weight_grid``, it rounds onto ``ctx.grid(name)``
  when that is not None (``round_to_nearest(w, args, grid=...)``, or the grid's methods). A calibrated one sets
  ``requires_calibration_data``, says in ``observes(plan)`` which Linears it observes, and accumulates in
  ``observe(ctx, name, module, inputs, output)`` into ``ctx.state(self.name)``, as ``Statistic`` subclasses
  (``Reduce`` per attribute; ``HessianAccumulator`` for Hessians) so that ``distributed`` can hold. What its output
  holds beyond plain uniform codes it returns from ``output_features(plan)``, e.g. ``{Feature.FRACTIONAL_ZEROS:
  "optimized zero points"}``: formats that do not hold it are refused at plan time.
- Grid (``Grid``): ``weight_grid(args)`` returns a ``WeightGrid`` (a subclass overriding ``group_size``, ``qparams``,
  ``quantize_scales``, ``quantize`` / ``dequantize``), or a ``CodebookGrid(values, name)`` for a non-uniform one.
  Named with a weight algorithm (``[mygrid, gptq]``) it is the plan's ``grid_algorithm`` and that algorithm
  chooses the codes on it; named alone it quantizes too, so it also implements ``quantize_weight``, typically
  ``round_to_nearest(module.weight, args, grid=ctx.grid(name))``. ``check`` refuses the ``WeightArgs`` it cannot
  hold; ``holds`` lists the features the code-choosing algorithm may produce on it (permuted and sweep groups by
  default), and ``output_features`` what it adds (``Feature.CODEBOOK``).
- Smoother or activation algorithm (``Smoother``, ``ActivationQuantizer``): a smoother implements ``observe`` (in the
  ``"smooth"`` phase it sees every quantized Linear of the layer) and ``smooth(ctx)``, which rewrites ``ctx.layer``
  keeping its output: the ``smoothing`` namespace gives the units (``ctx.subgraphs`` resolved), ranges and rewrites,
  ``ctx.block_inputs`` / ``ctx.run_block`` / ``ctx.linear_inputs`` the data a search compares,
  ``fake_quantize_weight`` a weight as the plan would round it. An activation algorithm returns ``ActQParams`` from
  ``quantize_act(ctx, name, module, args)`` (``args``: ``ActArgs``), having observed in the ``"quantize"`` phase the
  Linears whose ``plan.act_algorithm`` it is and for which its ``observes(plan)`` is True.
- Model transform (``ModelTransform``): ``transform_model(ctx)`` rewrites the whole model once, before any calibration
  input is caught, keeping its float function and its Linears' names (a rotation folded into the weights); ``ctx`` is
  a ``ModelContext``, ``ctx.note(text)`` reports what it did, ``ctx.samples`` are the calibration batches (None when
  data-free) and ``ctx.set_input_transform(name, matrix)`` makes a Linear multiply its input by a matrix at run time
  (an online rotation; declare ``Feature.ONLINE_TRANSFORM``). ``check_model(ctx)`` refuses, before any weight is read
  (on a weightless model), the structures it cannot rewrite exactly, naming the module.
- Exporter (``Exporter``, entry-point group ``slimquant.exporters``): ``export(model, output_dir, options)`` writes
  under ``output_dir`` only and returns the files written. Each quantized Linear is a ``FakeQuantLinear`` among
  ``model.named_modules()``: ``module.qweight`` gives its codes, scales, zeros, ``group_index()``, codebook;
  ``module.act_qparams`` and ``module.bias`` the rest. ``options["part_file_size"]`` is the shard size in GiB (0: one
  file), ``options["linear_types"]`` maps each Linear's name to its scheme's type (``"W4A16"``, ``"W8A8_DYNAMIC"``,
  ``"FLOAT"`` for one left in float) or is None, and ``options["pack_int4"]`` asks for two 4-bit codes per byte where
  the format allows. ``holds`` lists the ``Feature``s its files hold (the core refuses the others); ``check`` refuses,
  per plan, what else the format cannot hold (bits, shapes, activation schemes), and ``export`` refuses it again
  (``OutputError``). ``reference_model``, ``float_tensors``, ``write_folder`` and ``summarize`` build a Hugging Face
  folder.

``check_plugin(MyPlugin, args=..., scheme=...)`` then runs the contract on the tiny models of ``ARCHS``.
"""

from slimquant import __version__ as SLIMQUANT_VERSION
from slimquant.config.kv_cache import KVCacheArgs
from slimquant.config.scheme import ActArgs, Scheme, Strategy, WeightArgs
from slimquant.errors import CalibrationError, OutputError, PluginError, RecipeError, SlimquantError
from slimquant.export.hf_folder import check_structure, float_tensors, model_dtype, reference_model, write_folder
from slimquant.export.problems import summarize
from slimquant.export.reader import QuantizedFiles
from slimquant.features import Feature, features_of
from slimquant.hookspecs import CONTRACT_VERSION, hookimpl
from slimquant.loader import read_linear
from slimquant.model.structure import find_decoder_layers
from slimquant.plugins import CachePlan
from slimquant.quant.actparams import ActQParams
from slimquant.quant.cache_params import CacheQParams
from slimquant.quant.fake_linear import FakeQuantLinear
from slimquant.quant.grid import CodebookGrid, WeightGrid
from slimquant.quant.hessian import (
    HessianAccumulator,
    accumulate_shared,
    drop_dead_inputs,
    inverse_hessian_factor,
)
from slimquant.quant.math import (
    EPS,
    contiguous_group_minmax,
    expand_groups,
    fake_quantize_weight,
    quantize_weight_with,
    range_to_qparams,
    round_to_nearest,
    search_clip_ratio,
    signed_scale,
    weight_qparams,
)
from slimquant.quant.observers import TokenSample
from slimquant.quant.outliers import WeightOutliers
from slimquant.quant.qweight import (
    QuantizedScale,
    QuantizedWeight,
    contiguous_g_idx,
    effective_group_size,
    num_groups,
    qrange,
)
from slimquant.quant.two_level import TwoLevelScale
from slimquant.roles import (
    ActivationQuantizer,
    CacheQuantizer,
    Exporter,
    Grid,
    ModelTransform,
    Plugin,
    Smoother,
    WeightQuantizer,
)
from slimquant.runtime.context import LayerContext
from slimquant.runtime.model_context import ModelContext
from slimquant.runtime.plan import LinearPlan, name_matches
from slimquant.sdk import kv_attention, smoothing
from slimquant.stats import Reduce, Statistic
from slimquant.testing import (
    ARCHS,
    ContractError,
    check_declaration,
    check_plugin,
    check_run,
    tiny_model,
    token_samples,
)

__all__ = [
    # hook markers
    "CONTRACT_VERSION", "hookimpl",
    # role bases and output features
    "ActivationQuantizer", "CacheQuantizer", "Exporter", "Grid", "ModelTransform", "Plugin", "Smoother",
    "WeightQuantizer", "Feature", "features_of",
    # plan types
    "ActArgs", "CachePlan", "KVCacheArgs", "LayerContext", "LinearPlan", "ModelContext", "Scheme", "Strategy",
    "WeightArgs", "name_matches",
    # quantized-weight types and grids
    "ActQParams", "CacheQParams", "CodebookGrid", "FakeQuantLinear", "QuantizedScale", "QuantizedWeight",
    "TwoLevelScale", "WeightGrid", "WeightOutliers", "contiguous_g_idx", "effective_group_size", "num_groups", "qrange",
    # the math API: uniform quantization, Hessians
    "EPS", "contiguous_group_minmax", "expand_groups", "fake_quantize_weight", "quantize_weight_with",
    "range_to_qparams", "round_to_nearest", "search_clip_ratio", "signed_scale", "weight_qparams",
    "HessianAccumulator", "accumulate_shared", "drop_dead_inputs", "inverse_hessian_factor",
    # statistics
    "Reduce", "Statistic", "TokenSample",
    # errors
    "CalibrationError", "OutputError", "PluginError", "RecipeError", "SlimquantError",
    # exporter helpers
    "SLIMQUANT_VERSION", "QuantizedFiles", "check_structure", "find_decoder_layers", "float_tensors",
    "model_dtype", "read_linear", "reference_model", "summarize", "write_folder",
    # namespaces: smoothers' rewrites, the attention cache
    "kv_attention", "smoothing",
    # testing
    "ARCHS", "ContractError", "check_declaration", "check_plugin", "check_run", "tiny_model", "token_samples",
]
