"""The roles a plugin takes (contract v3), as base classes with typed capabilities.

A plugin class subclasses the role base of each role it takes (``class MyGrid(Grid, WeightQuantizer)``) and
implements, marked ``@hookimpl``, the hook that makes each role (``ROLE_HOOK``); the hooks of ``slimquant.hookspecs``
say when each is called. A role's capabilities are class attributes with the types below (``__init__`` may refine
them per instance from the config). When the plugin loads, and again once it is built, the runtime refuses a
class that takes no role, a role without its hook, a hook that belongs to no role it takes, a capability of the
wrong type, and an attribute that looks like a misspelt capability, naming the plugin and the attribute.

Capabilities, by role (defaults in brackets):

- every algorithm: ``requires_calibration_data: bool`` [False]: it cannot work without calibration samples (GPTQ's
  Hessians, a smoother's ranges); when no plugin of a run requires data and none observes a Linear, the run takes
  the data-free path. ``distributed: bool`` [False]: a run on several processes gives what one would: every
  statistic it keeps in ``ctx.state`` is a ``Statistic`` and it searches nothing on one process's data (checked:
  a plain tensor kept in ``ctx.state`` is refused, naming the plugin and the key). ``aliases: dict[str, str]``
  [{}]: the names other tools give it (keys ``msmodelslim.w_method``, ``msmodelslim.anti_method``,
  ``msmodelslim.sparse``, ``paddleslim``).
- algorithms with an ``observe`` hook: ``observes_output: bool`` [False]: True when ``observe`` reads the Linear's
  output (otherwise it is called before the Linear runs, with ``output`` None); ``observes(plan) -> bool``
  [observes the Linears whose plan names it as weight or activation algorithm].
- ``WeightQuantizer`` (``quantize_weight``): ``sequential: bool`` [False]: observe each Linear's inputs after the
  Linears before it were quantized (GPTQ's true_sequential); ``accepts_weight_grid: bool`` [False]: rounds onto the
  plan's grid (``ctx.grid(name)``) when another plugin provides one; ``row_parallel: bool`` [False]: quantizes only
  ``ctx.row_block(name)`` of the rows when asked; ``linear_cost(rows, cols) -> float`` [rows * cols]: the work of
  quantizing a rows x cols weight, for sharing clusters of Linears among processes; ``output_features(plan)``
  [{}]: the ``Feature``s its output has for that plan (see slimquant.features).
- ``ActivationQuantizer`` (``quantize_act``), ``Smoother`` (``smooth``), ``CacheQuantizer`` (``quantize_cache``):
  the common capabilities only.
- ``Grid`` (``weight_grid``): ``holds: frozenset[Feature]`` [permuted and sweep groups]: what the weight algorithm
  that chooses the codes may produce on this grid; ``output_features(plan)`` [{}] (a codebook grid: CODEBOOK).
- ``ModelTransform`` (``transform_model``, optional ``check_model`` on the weightless model before loading):
  ``output_features(plan)`` [{}] (an online rotation: ONLINE_TRANSFORM);
  ``lazy: bool`` [False]: it can run on a model whose decoder layers are read one at a time from disk.
- ``Exporter`` (``export``, entry-point group ``slimquant.exporters``): ``holds: frozenset[Feature]`` [none]: the
  features its files hold; ``scale_dtype: str | None`` [None]: the float type its files store weight scales in
  (``"float16"``): the CLI gives a recipe that sets no ``weights.scale_dtype`` that type when the format's
  ``check`` then accepts the plan.
"""

from __future__ import annotations

import difflib
from typing import ClassVar

from slimquant.features import GRID_DEFAULT, Feature

COMMON = {"requires_calibration_data": bool, "distributed": bool, "observes_output": bool}


class Plugin:
    """What every plugin has: ``name`` (its entry-point name), ``Config`` (a pydantic model with
    ``name: Literal[name]`` and ``extra="forbid"``) and ``config``, the validated Config it is built with."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = None
    aliases: ClassVar[dict[str, str]] = {}
    capabilities: ClassVar[dict[str, object]] = {}
    requires_calibration_data: bool = False
    distributed: bool = False
    observes_output: bool = False

    def __init__(self, config=None):
        self.config = config if config is not None or self.Config is None else self.Config()

    def observes(self, plan) -> bool:
        """Whether the quantize-phase observation pass shows this plugin the inputs of a Linear with ``plan``
        (only plugins with an ``observe`` hook are asked)."""
        return self.name in (plan.weight_algorithm, plan.act_algorithm)

    def output_features(self, plan) -> dict[Feature, str]:
        """The features this plugin's output has for ``plan``, each with the setting that causes it."""
        return {}


class WeightQuantizer(Plugin):
    """Quantizes a Linear's weight: ``quantize_weight`` returns its ``QuantizedWeight`` (``observe`` optional)."""

    capabilities = {**COMMON, "sequential": bool, "accepts_weight_grid": bool, "row_parallel": bool}
    sequential: bool = False
    accepts_weight_grid: bool = False
    row_parallel: bool = False

    def linear_cost(self, rows: int, cols: int) -> float:
        """The work of quantizing a rows x cols weight, in any unit common to the run's plugins."""
        return float(rows * cols)


class ActivationQuantizer(Plugin):
    """Chooses a Linear input's quantization: ``quantize_act`` returns its ``ActQParams`` (``observe`` optional)."""

    capabilities = dict(COMMON)


class Smoother(Plugin):
    """Rewrites a decoder layer keeping its output (``smooth``), after observing it (``observe``)."""

    capabilities = dict(COMMON)
    requires_calibration_data = True


class Grid(Plugin):
    """Defines the values a weight's codes stand for (``weight_grid``), which weight algorithms round onto."""

    capabilities = {**COMMON, "holds": frozenset}
    holds: frozenset = GRID_DEFAULT


class CacheQuantizer(Plugin):
    """Quantizes the attention cache: ``quantize_cache`` returns a layer's ``CacheQParams`` (``observe_cache``)."""

    capabilities = dict(COMMON)


class ModelTransform(Plugin):
    """Rewrites the whole model once before any layer is calibrated (``transform_model``), keeping its function."""

    capabilities = {**COMMON, "lazy": bool}
    lazy: bool = False


class Exporter(Plugin):
    """Writes the quantized model in one output format (``export``), in the entry-point group
    ``slimquant.exporters``."""

    capabilities = {"holds": frozenset, "scale_dtype": (str, type(None))}
    holds: frozenset = frozenset()
    scale_dtype: str | None = None


ROLE_HOOK = {WeightQuantizer: "quantize_weight", ActivationQuantizer: "quantize_act", Smoother: "smooth",
             Grid: "weight_grid", CacheQuantizer: "quantize_cache", ModelTransform: "transform_model",
             Exporter: "export"}
ROLE_LABELS = {WeightQuantizer: "weights", ActivationQuantizer: "activations", Smoother: "smoother", Grid: "grid",
               CacheQuantizer: "kv cache", ModelTransform: "model transform", Exporter: "format"}
EXTRA_HOOKS = {WeightQuantizer: ("observe",), ActivationQuantizer: ("observe",), Smoother: ("observe",),
               CacheQuantizer: ("observe_cache",), ModelTransform: ("check_model",), Exporter: ("check_model",)}
ALIAS_KEYS = ("msmodelslim.w_method", "msmodelslim.anti_method", "msmodelslim.sparse", "paddleslim")
ALL_CAPABILITIES = {c for role in ROLE_HOOK for c in role.capabilities}
BASE_NAMES = ({n for role in (Plugin, *ROLE_HOOK) for n in vars(role)} | {"config"}) - (ALL_CAPABILITIES - set(COMMON))


def roles_of(cls: type) -> list[type]:
    return [role for role in ROLE_HOOK if isinstance(cls, type) and issubclass(cls, role)]


def role_names(cls: type) -> str:
    return ", ".join(role.__name__ for role in roles_of(cls))


def role_problems(cls: type, hooks: list[str], exporter: bool) -> list[str]:
    """What is wrong with a plugin class's roles, hooks and capabilities (empty when nothing)."""
    name = getattr(cls, "name", cls.__name__)
    roles = roles_of(cls)
    if not roles:
        bases = ", ".join(r.__name__ for r in ROLE_HOOK if (r is Exporter) == exporter)
        return [f"plugin {name!r} takes no role: contract v3 plugins subclass the base of each role they take "
                f"({bases}, from slimquant.sdk) and implement its hook"]
    problems = []
    if exporter != (Exporter in roles) or (exporter and len(roles) > 1):
        problems.append(f"plugin {name!r} ({role_names(cls)}): an output format subclasses Exporter alone, and an "
                        "algorithm does not subclass Exporter")
    allowed = {"check"}
    for role in roles:
        allowed |= {ROLE_HOOK[role], *EXTRA_HOOKS.get(role, ())}
        if ROLE_HOOK[role] not in hooks:
            problems.append(f"plugin {name!r} is a {role.__name__} but has no @hookimpl {ROLE_HOOK[role]}: the "
                            "runtime would never call it")
    problems += [f"plugin {name!r} implements {hook}, which none of its roles ({role_names(cls)}) has; subclass the "
                 "role that has it" for hook in hooks if hook not in allowed]
    problems += capability_problems(cls, roles)
    return problems


def capability_problems(plugin, roles: list[type] | None = None) -> list[str]:
    """Capabilities of the wrong type, and attributes that look like a misspelt capability, on a class or instance."""
    cls = plugin if isinstance(plugin, type) else type(plugin)
    name = getattr(cls, "name", cls.__name__)
    roles = roles if roles is not None else roles_of(cls)
    declared = {c: kind for role in roles for c, kind in role.capabilities.items()}
    problems = []
    for capability, kind in declared.items():
        value = getattr(plugin, capability)
        if kind is frozenset:
            if not (isinstance(value, (set, frozenset)) and all(isinstance(f, Feature) for f in value)):
                problems.append(f"{name}.{capability} must be a frozenset of slimquant.sdk.Feature, got {value!r}")
        elif not isinstance(value, kind) or (kind is bool) != isinstance(value, bool):
            problems.append(f"{name}.{capability} must be {_type_name(kind)}, got {value!r}")
    aliases = getattr(plugin, "aliases", {})
    if not (isinstance(aliases, dict) and all(k in ALIAS_KEYS and isinstance(v, str) for k, v in aliases.items())):
        problems.append(f"{name}.aliases must map some of {', '.join(ALIAS_KEYS)} to strings, got {aliases!r}")
    own = set(vars(plugin)) if not isinstance(plugin, type) else set()
    for klass in cls.__mro__:
        if klass not in (object, Plugin, *ROLE_HOOK):
            own |= set(vars(klass))
    for attr in sorted(own - BASE_NAMES - set(declared)):
        if attr.startswith("_") or callable(getattr(cls, attr, None)):
            continue
        if attr in ALL_CAPABILITIES:
            problems.append(f"{name}.{attr} is not a capability of its roles ({role_names(cls)})")
            continue
        close = difflib.get_close_matches(attr, sorted(declared), n=1, cutoff=0.75)
        if close:
            problems.append(f"{name}.{attr} is not a capability; did you mean {close[0]}?")
    return problems


def _type_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("None" if k is type(None) else k.__name__ for k in kinds)


def is_plugin_class(cls) -> bool:
    return isinstance(cls, type) and issubclass(cls, Plugin)


__all__ = ["ActivationQuantizer", "CacheQuantizer", "Exporter", "Grid", "ModelTransform", "Plugin", "ROLE_HOOK",
           "Smoother", "WeightQuantizer", "capability_problems", "role_problems", "roles_of"]
