"""Find plugins through entry points, load only the ones a recipe names, validate their arguments, dispatch hooks.

Algorithms live in the entry-point group ``slimquant.plugins``, output formats in ``slimquant.exporters``; the
contract is ``slimquant.hookspecs``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

import pluggy
import torch
from pydantic import AliasChoices, AliasPath, BaseModel, ValidationError

from slimquant import hookspecs
from slimquant.config.kv_cache import KVCacheArgs
from slimquant.config.recipe import Recipe, format_validation_error
from slimquant.errors import OutputError, PluginError, RecipeError, SlimquantError
from slimquant.features import PLAN_ONLY, Feature, check_features, features_of, refusals
from slimquant.roles import capability_problems, role_problems

ALGORITHMS = "slimquant.plugins"
EXPORTERS = "slimquant.exporters"
KIND = {ALGORITHMS: "algorithm", EXPORTERS: "output format"}
HOOK_NAMES = ("check", "observe", "smooth", "quantize_weight", "quantize_act", "weight_grid", "observe_cache",
              "quantize_cache", "check_model", "transform_model", "export")
ALGORITHM_HOOKS = ("observe", "smooth", "quantize_weight", "quantize_act", "weight_grid", "observe_cache",
                   "quantize_cache", "check_model", "transform_model")
ROLE_HOOKS = ("smooth", "quantize_weight", "quantize_act", "weight_grid", "quantize_cache",
              "transform_model")  # each gives a plan role
# what a hook may raise that is not the plugin's fault: passed on as it is, not as a PluginError
NOT_WRAPPED = (SlimquantError, OSError, MemoryError, torch.OutOfMemoryError)
DEFAULT_ALGORITHM = "minmax"
UNIFORM_GRID = "uniform"  # an override's grid: the integer grid, whatever grid the recipe's algorithms name


@dataclass(frozen=True)
class PluginInfo:
    name: str
    value: str
    distribution: str
    version: str


def installed(group: str = ALGORITHMS) -> dict[str, PluginInfo]:
    """Every plugin declared under the entry-point group, without importing any of them."""
    found: dict[str, PluginInfo] = {}
    for ep in entry_points(group=group):
        dist = getattr(ep, "dist", None)
        found.setdefault(ep.name, PluginInfo(
            ep.name, ep.value, dist.metadata["Name"] if dist else "?", dist.version if dist else "?"))
    return dict(sorted(found.items()))


def _entry_point(name: str, group: str) -> EntryPoint:
    matches = [ep for ep in entry_points(group=group) if ep.name == name]
    if not matches:
        other = EXPORTERS if group == ALGORITHMS else ALGORITHMS
        if name in installed(other):
            raise PluginError(f"{name!r} is an installed {KIND[other]}, not an {KIND[group]}"
                              + ("; choose it with --save-type / save_type" if other == EXPORTERS else ""))
        same_but_case = [n for n in installed(group) if n.lower() == name.lower()]
        if same_but_case:
            raise PluginError(f"unknown {KIND[group]} {name!r}: names are case-sensitive: did you mean "
                              f"{same_but_case[0]!r}?")
        known = ", ".join(installed(group)) or "none"
        raise PluginError(f"unknown {KIND[group]} {name!r}; installed {KIND[group]}s: {known} "
                          f"(another may come from `pip install slimquant-{name.lower()}`)")
    values = {ep.value for ep in matches}
    if len(values) > 1:
        raise PluginError(f"{KIND[group]} {name!r} is declared by several distributions: {sorted(values)}")
    return matches[0]


def load_plugin_class(name: str, group: str = ALGORITHMS) -> type:
    ep = _entry_point(name, group)
    try:
        cls = ep.load()
    except Exception as exc:  # a broken plugin must name itself, and not take others down with it
        raise PluginError(f"plugin {name!r} ({ep.value}) failed to import: {type(exc).__name__}: {exc}") from exc
    declared = getattr(cls, "name", None)
    if declared != name:
        raise PluginError(f"plugin {ep.value} declares name {declared!r} but its entry point is {name!r}")
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        raise PluginError(f"plugin {name!r} has no pydantic `Config` model for its arguments")
    literal = config.model_fields.get("name")
    if literal is None or typing.get_args(literal.annotation) != (name,):
        raise PluginError(f"plugin {name!r}: Config.name must be Literal[{name!r}]")
    problems = role_problems(cls, hooks_of(cls), exporter=group == EXPORTERS)
    if problems:
        raise PluginError("; ".join(problems))
    return cls


def build_plugin(cls: type, config: BaseModel):
    """The plugin built from its validated Config, its capabilities checked again (``__init__`` may set them)."""
    plugin = cls(config)
    problems = capability_problems(plugin)
    if problems:
        raise PluginError("; ".join(problems))
    return plugin


def hooks_of(cls: type) -> list[str]:
    return [h for h in HOOK_NAMES if getattr(getattr(cls, h, None), f"{hookspecs.PROJECT}_impl", None) is not None]


def validate_args(cls: type, args: dict, where: str) -> BaseModel:
    """The plugin's Config from a recipe's arguments; a key the Config does not declare is refused whatever the
    Config's own `extra` setting (pydantic ignores unknown keys by default)."""
    known = config_keys(cls.Config)
    unknown = [key for key in args if key not in known]
    if unknown:
        problems = "; ".join(f"{key}: unknown key for {cls.name!r} (check the spelling; it takes "
                             f"{', '.join(sorted(known))})" for key in unknown)
        raise RecipeError(f"{where}: {len(unknown)} problem(s): {problems}")
    try:
        return cls.Config.model_validate(args)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, where)) from None


def config_keys(config: type[BaseModel]) -> set[str]:
    """The keys a Config accepts: its field names and their aliases."""
    keys = set()
    for field_name, info in config.model_fields.items():
        keys.add(field_name)
        for alias in (info.alias, info.validation_alias):
            choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
            for choice in choices:
                if isinstance(choice, AliasPath):
                    choice = choice.path[0]
                if isinstance(choice, str):
                    keys.add(choice)
    return keys


# -- capabilities, typed attributes of the role bases (slimquant.roles), validated when a plugin loads ----------


def requires_calibration_data(plugin) -> bool:
    return plugin.requires_calibration_data


def is_sequential(plugin) -> bool:
    return getattr(plugin, "sequential", False)


def runs_distributed(plugin) -> bool:
    """The plugin's statistics are all `slimquant.stats.Statistic` objects and it searches nothing on data a single
    process holds, so a run on several processes gives what one process would (see slimquant.runtime.distributed)."""
    return plugin.distributed


def row_parallel(plugin) -> bool:
    """quantize_weight quantizes only `ctx.row_block(name)` of the Linear's rows when asked to (rows independent)."""
    return getattr(plugin, "row_parallel", False)


def linear_cost(plugin, rows: int, cols: int) -> float:
    """The plugin's estimate of the work of quantizing a rows x cols weight (rows x cols when it gives none)."""
    return float(plugin.linear_cost(rows, cols))


def accepts_weight_grid(plugin_or_class) -> bool:
    return getattr(plugin_or_class, "accepts_weight_grid", False)


def observes(plugin, plan) -> bool:
    return "observe" in hooks_of(type(plugin)) and bool(plugin.observes(plan))


def aliases(plugin_class: type) -> dict[str, str]:
    return dict(getattr(plugin_class, "aliases", {}) or {})


def find_by_alias(key: str, value: str) -> str | None:
    """The installed algorithm that declares `aliases[key] == value` (case-insensitive), importing each to read it."""
    for name in installed(ALGORITHMS):
        try:
            cls = load_plugin_class(name)
        except PluginError:
            continue
        if str(aliases(cls).get(key, "")).lower() == str(value).lower():
            return name
    return None


# -- a run's plugins ----------------------------------------------------------------------------------------------


class PluginSet:
    """The plugins one run uses, registered on one pluggy manager; each hook is called on one chosen plugin."""

    def __init__(self, plugins: dict[str, object]):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins = plugins
        for name, plugin in plugins.items():
            self.pm.register(plugin, name=name)
        self.pm.check_pending()
        self._callers: dict[tuple[str, str], object] = {}

    def call(self, plugin: str, hook: str, **kwargs):
        """Call `hook` on plugin `plugin` alone; None when it does not implement the hook."""
        if hook not in hooks_of(type(self.plugins[plugin])):
            return None
        caller = self._callers.get((plugin, hook))
        if caller is None:
            others = [p for n, p in self.plugins.items() if n != plugin]
            caller = self._callers[(plugin, hook)] = self.pm.subset_hook_caller(hook, remove_plugins=others)
        try:
            result = caller(**kwargs)
        except NOT_WRAPPED:
            raise
        except Exception as exc:  # a bug in the plugin: say whose, where, on what
            raise PluginError(f"plugin {plugin!r} failed in {hook}{_call_site(kwargs)}: {type(exc).__name__}: "
                              f"{exc}") from exc
        if caller.spec is not None and not caller.spec.opts.get("firstresult"):
            return result[0] if result else None  # one plugin: its own return value, not pluggy's list of them
        return result

    def get(self, name: str):
        return self.plugins[name]


def _call_site(kwargs: dict) -> str:
    """Where a hook failed, for its error message: on the Linear, or on the decoder layer for per-layer hooks."""
    if kwargs.get("name"):
        return f" on {kwargs['name']}"
    prefix = getattr(kwargs.get("ctx"), "prefix", None)
    return f" on {prefix}" if prefix else ""


@dataclass(frozen=True)
class CachePlan:
    """What the cache algorithm's `check` sees: the recipe's kv_cache arguments."""

    args: KVCacheArgs
    algorithm: str


@dataclass
class AlgorithmPlan:
    plugins: PluginSet
    smoothers: list[str]
    weight_algorithm: str
    act_algorithm: str
    exporters: PluginSet = field(default_factory=lambda: PluginSet({}))
    grid_algorithm: str | None = None  # the plugin whose weight_grid every Linear's codes are rounded onto
    cache: CachePlan | None = None  # the attention cache's quantization, when the recipe has a kv_cache section
    transforms: list[str] = field(default_factory=list)  # model transforms, in recipe order

    @property
    def cache_algorithm(self) -> str | None:
        return None if self.cache is None else self.cache.algorithm

    def check_cache(self, name: str | None = None, shape: tuple[int, int] | None = None) -> list[str]:
        if self.cache is None:
            return []
        problems = self.plugins.call(self.cache.algorithm, "check", plan=self.cache, name=name, shape=shape) or []
        problems = [f"kv_cache ({self.cache.algorithm}): {p}" for p in problems]
        if name is None:
            problems += [f"save_type {fmt}: this format cannot hold a quantized KV cache; leave out kv_cache or save "
                         "in a format that holds one" for fmt, exporter in self.exporters.plugins.items()
                         if Feature.KV_CACHE not in exporter.holds]
        return problems

    def grid_for(self, weight_algorithm: str, grid: str | None = None) -> str | None:
        """The grid provider of a Linear quantized by `weight_algorithm`: an override's `grid` ("uniform": none),
        else the algorithm's own when it provides a grid itself (an override naming a grid provider), else the
        recipe's."""
        if grid is not None:
            return None if grid == UNIFORM_GRID else grid
        if "weight_grid" in hooks_of(type(self.plugins.get(weight_algorithm))):
            return weight_algorithm
        return self.grid_algorithm

    def requires_calibration_data(self, plans) -> bool:
        """False when every Linear can be quantized from its weight alone: the data-free path."""
        plans = [p for p in plans if p is not None]
        if self.smoothers or (self.cache is not None and not self.cache.args.dynamic):
            return True
        if any(requires_calibration_data(self.plugins.get(n)) for n in self.transforms):
            return True
        for plugin in self.plugins.plugins.values():
            if requires_calibration_data(plugin) and any(plugin.name in (p.weight_algorithm, p.act_algorithm)
                                                         for p in plans):
                return True
            if any(observes(plugin, p) for p in plans):
                return True
        return False

    def linear_plan(self, scheme, weight_algorithm: str, grid: str | None = None):
        """The Linear's plan, with the features its output will have (slimquant.features): the weight algorithm's,
        the grid provider's, the transforms' and the scheme's own, each with who causes it."""
        from slimquant.runtime.plan import LinearPlan

        plan = LinearPlan(scheme, weight_algorithm, self.act_algorithm, self.grid_for(weight_algorithm, grid))
        features: dict[Feature, tuple[str, str]] = {}
        if scheme.weights.channel_bits:
            features[Feature.TWO_LEVEL_SCALES] = ("the scheme", "weights.channel_bits")
        producers = dict.fromkeys([weight_algorithm, *([plan.grid_algorithm] if plan.grid_algorithm else []),
                                   *self.transforms])
        for name in producers:
            plugin = self.plugins.get(name)
            try:
                declared = check_features(plugin.output_features(plan), f"plugin {name!r}")
            except TypeError as exc:
                raise PluginError(str(exc)) from None
            for feature, setting in declared.items():
                features.setdefault(feature, (name, setting))
        return plan.with_features(features)

    def scheme_plans(self, recipe: Recipe) -> list:
        """One LinearPlan per scheme of the recipe (the base and each override), before any model is known."""
        from slimquant.runtime.plan import override_scheme

        base = recipe.base_scheme()
        plans = [self.linear_plan(base, self.weight_algorithm)]
        for override in recipe.overrides:
            plans.append(self.linear_plan(override_scheme(base, override), override.algorithm or self.weight_algorithm,
                                          override.grid))
        return plans

    def sequential(self, plans) -> bool:
        names = {p.weight_algorithm for p in plans if p is not None}
        return any(is_sequential(self.plugins.get(n)) for n in names)

    def observers(self, plan) -> list[str]:
        """The plugins that observe a Linear with this plan in the quantize pass."""
        names = dict.fromkeys([plan.weight_algorithm, plan.act_algorithm])
        return [n for n in names if observes(self.plugins.get(n), plan)]

    def observe_before_run(self, observers: list[str]) -> bool:
        """Whether every one of these observing plugins does without the Linear's output (see ``observes_output``)."""
        return not any(self.plugins.get(n).observes_output for n in observers)

    def check(self, plan, name: str | None = None, shape: tuple[int, int] | None = None) -> list[str]:
        act = [plan.act_algorithm] if plan.scheme.activations else []
        problems = []
        grid = [plan.grid_algorithm] if plan.grid_algorithm else []
        quantizer = self.plugins.get(plan.weight_algorithm)
        if plan.scheme.weights.channel_bits and not accepts_weight_grid(quantizer):
            problems.append(f"{plan.weight_algorithm}: cannot choose codes on two-level scales (weights.channel_bits, "
                            "W4A8_DYNAMIC per group): it does not declare accepts_weight_grid")
        if plan.scheme.weights.channel_bits and grid:
            problems.append(f"weights.channel_bits: two-level scales are for the uniform grid, not {grid[0]!r}'s")
        if grid and grid != [plan.weight_algorithm] and not accepts_weight_grid(quantizer):
            problems.append(f"{plan.weight_algorithm}: cannot round onto the weight grid of {plan.grid_algorithm!r} "
                            "(it does not declare accepts_weight_grid)")
        features = plan.feature_map()
        if grid and grid != [plan.weight_algorithm]:
            made_by_quantizer = {f: who for f, who in features.items() if who[0] == plan.weight_algorithm}
            problems += refusals(made_by_quantizer, self.plugins.get(grid[0]).holds, f"{grid[0]}: its grid ")
        shown = {f: who for f, who in features.items() if f not in PLAN_ONLY}
        for fmt, exporter in self.exporters.plugins.items():
            problems += refusals(shown, exporter.holds, f"save_type {fmt}: this format ")
        for plugin in dict.fromkeys([plan.weight_algorithm, *grid, *act, *self.smoothers]):
            problems += [f"{plugin}: {p}" for p in self.plugins.call(plugin, "check", plan=plan, name=name,
                                                                     shape=shape) or []]
        for fmt in self.exporters.plugins:
            problems += [f"save_type {fmt}: {p}" for p in self.exporters.call(fmt, "check", plan=plan, name=name,
                                                                                shape=shape) or []]
        return problems


def _single(role: str, candidates: list[str]) -> str:
    if len(candidates) > 1:
        raise RecipeError(f"several {role} algorithms named: {', '.join(candidates)}; name one, "
                          "and pick others per layer with `overrides: [{targets: ..., algorithm: ...}]`")
    return candidates[0] if candidates else DEFAULT_ALGORITHM


def _grid_provider(weight_algos: list[str], classes: dict[str, type]) -> tuple[str | None, list[str]]:
    """Of two weight algorithms, the one that alone provides `weight_grid` provides the grid and the other rounds
    onto it; a grid provider named alone does both. Returns (grid provider or None, the weight algorithms left)."""
    grids = [n for n in weight_algos if "weight_grid" in hooks_of(classes[n])]
    if len(weight_algos) == 1 and grids:
        return grids[0], weight_algos
    if len(weight_algos) != 2 or len(grids) != 1:
        return None, weight_algos
    quantizer = next(n for n in weight_algos if n != grids[0])
    if not accepts_weight_grid(classes[quantizer]):
        raise RecipeError(f"algorithms: {quantizer!r} cannot round onto the weight grid of {grids[0]!r} (it does "
                          f"not declare accepts_weight_grid); name {grids[0]!r} alone or with one that does")
    return grids[0], [quantizer]


def load_exporters(formats: list[str]) -> dict[str, object]:
    exporters = {}
    for fmt in formats:
        try:
            cls = load_plugin_class(fmt, EXPORTERS)
        except PluginError as exc:
            raise RecipeError(f"save_type {fmt!r}: {exc}") from None
        exporters[fmt] = build_plugin(cls, cls.Config())
    return exporters


def feature_problems(model, exporter, fmt: str) -> list[str]:
    """At export: the features the model's quantized Linears hold that the format does not (a saved output
    converted later was never planned for it), one line per feature with the Linears that have it."""
    from slimquant.quant.fake_linear import FakeQuantLinear

    found: dict[Feature, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantLinear):
            online = {Feature.ONLINE_TRANSFORM} if module.input_transform is not None else set()
            for feature in (features_of(module.qweight) | online) - exporter.holds:
                found.setdefault(feature, []).append(name)
    return [f"save_type {fmt}: this format cannot hold {feature.meaning} ({feature.value}): {names[0]}"
            + (f" and {len(names) - 1} other Linear(s)" if len(names) > 1 else "")
            for feature, names in sorted(found.items(), key=lambda item: item[0].value)]


def refuse_features(model, exporter, fmt: str) -> None:
    problems = feature_problems(model, exporter, fmt)
    if problems:
        raise OutputError("; ".join(problems))


def plan_algorithms(recipe: Recipe, formats: list[str] | None = None) -> AlgorithmPlan:
    """Load the named plugins (and minmax when it is needed), validate their arguments, assign roles, and run
    each plugin's plan-time `check` on every scheme of the recipe, before any model is loaded."""
    specs = {a["name"]: a for a in recipe.algorithms}
    override_algos = [o.algorithm for o in recipe.overrides if o.algorithm]
    override_grids = [o.grid for o in recipe.overrides if o.grid and o.grid != UNIFORM_GRID]
    names = list(dict.fromkeys(list(specs) + override_algos + override_grids))
    classes: dict[str, type] = {}
    for i, name in enumerate(names):
        try:
            classes[name] = load_plugin_class(name)
        except PluginError as exc:
            where = (f"algorithms[{i}]" if name in specs else
                     "overrides.algorithm" if name in override_algos else "overrides.grid")
            raise RecipeError(f"{where}: {exc}") from None
    cache = _plan_cache(recipe, classes, list(specs))
    for name in override_algos:
        if "quantize_weight" not in hooks_of(classes[name]):
            raise RecipeError(f"overrides.algorithm: {name!r} does not quantize weights")
    for name in override_grids:
        if "weight_grid" not in hooks_of(classes[name]):
            raise RecipeError(f"overrides.grid: {name!r} provides no weight grid (name a Grid plugin, or "
                              f"{UNIFORM_GRID!r})")

    weight_algos = [n for n in specs if "quantize_weight" in hooks_of(classes[n]) and n not in override_algos]
    grid_algorithm, weight_algos = _grid_provider(weight_algos, classes)
    if len(weight_algos) > 1 and DEFAULT_ALGORITHM in weight_algos:  # minmax named for its activation args
        weight_algos.remove(DEFAULT_ALGORITHM)
    act_algos = [n for n in specs if "quantize_act" in hooks_of(classes[n]) and n != DEFAULT_ALGORITHM]
    weight_algorithm = _single("weight", weight_algos)
    act_algorithm = _single("activation", act_algos)
    if DEFAULT_ALGORITHM in (weight_algorithm, act_algorithm) and DEFAULT_ALGORITHM not in classes:
        classes[DEFAULT_ALGORITHM] = load_plugin_class(DEFAULT_ALGORITHM)

    plugins = {}
    for i, (name, cls) in enumerate(classes.items()):
        where = f"algorithms[{i}] ({name})" if name in specs else f"{name} arguments"
        plugins[name] = build_plugin(cls, validate_args(cls, specs.get(name, {"name": name}), where))
    smoothers = [n for n in specs if "smooth" in hooks_of(classes[n])]
    transforms = [n for n in specs if "transform_model" in hooks_of(classes[n])]
    plan = AlgorithmPlan(PluginSet(plugins), smoothers, weight_algorithm, act_algorithm,
                         PluginSet(load_exporters(formats or [])), grid_algorithm, cache, transforms)
    _refuse_roleless(recipe, plan)
    check_schemes(recipe, plan)
    return plan


def _refuse_roleless(recipe: Recipe, plan: AlgorithmPlan) -> None:
    """Every algorithm the recipe names must get a role: one that gets none would never be called, and minmax
    would quantize in its place (a quantize_weight left without @hookimpl, an observe-only plugin)."""
    roles = {plan.weight_algorithm, plan.act_algorithm, plan.grid_algorithm, plan.cache_algorithm, *plan.smoothers,
             *plan.transforms, *(o.algorithm for o in recipe.overrides), *(o.grid for o in recipe.overrides)}
    for i, spec in enumerate(recipe.algorithms):
        name = spec["name"]
        if name not in roles:
            hooks = ", ".join(hooks_of(type(plan.plugins.get(name)))) or "none"
            raise RecipeError(
                f"algorithms[{i}]: {name!r} gets no role in this plan (hooks: {hooks}): it is not the weight "
                f"algorithm ({plan.weight_algorithm}), the activation algorithm ({plan.act_algorithm}), a smoother, "
                "a model transform, the grid provider nor the cache algorithm")


def _plan_cache(recipe: Recipe, classes: dict[str, type], named: list[str]) -> CachePlan | None:
    """The cache algorithm of a recipe with a kv_cache section (loaded into `classes`); a cache plugin named in
    `algorithms` without one is a mistake."""
    args = recipe.kv_cache
    if args is None:
        for i, name in enumerate(named):
            if "quantize_cache" in hooks_of(classes[name]) and not {"quantize_weight", "quantize_act", "smooth"} & set(
                    hooks_of(classes[name])):
                raise RecipeError(f"algorithms[{i}]: {name!r} quantizes the attention cache; add a `kv_cache` "
                                  "section (e.g. kv_cache: {bits: 8}) to use it")
        return None
    algorithm = args.algorithm or _default_cache_algorithm(classes, named)
    if algorithm not in classes:
        try:
            classes[algorithm] = load_plugin_class(algorithm)
        except PluginError as exc:
            raise RecipeError(f"kv_cache.algorithm: {exc}") from None
    if "quantize_cache" not in hooks_of(classes[algorithm]):
        raise RecipeError(f"kv_cache.algorithm: {algorithm!r} does not quantize the attention cache (it is no "
                          "CacheQuantizer)")
    return CachePlan(args, algorithm)


def _default_cache_algorithm(classes: dict[str, type], named: list[str]) -> str:
    """The cache algorithm a kv_cache section that names none gets: the one named in `algorithms`, else the one
    installed."""
    in_recipe = [n for n in named if "quantize_cache" in hooks_of(classes[n])]
    if len(in_recipe) == 1:
        return in_recipe[0]
    candidates = in_recipe
    if not candidates:
        for name in installed(ALGORITHMS):
            try:
                if "quantize_cache" in hooks_of(load_plugin_class(name)):
                    candidates.append(name)
            except PluginError:
                continue
    if len(candidates) != 1:
        found = f"{len(candidates)} are: {', '.join(candidates)}" if candidates else "none is installed"
        raise RecipeError(f"kv_cache.algorithm: name the plugin that quantizes the attention cache ({found})")
    return candidates[0]


def check_schemes(recipe: Recipe, algorithms: AlgorithmPlan) -> None:
    """The plan-time check on the base scheme and on each override's, with the recipe field named."""
    problems = list(algorithms.check_cache())
    for i, plan in enumerate(algorithms.scheme_plans(recipe)):
        where = "scheme" if i == 0 else f"overrides[{i - 1}]"
        problems += [f"{where}: {p}" for p in algorithms.check(plan)]
    if problems:
        raise RecipeError("the recipe asks for what its plugins cannot do: " + "; ".join(problems))
