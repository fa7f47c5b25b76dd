"""Find algorithm plugins through entry points, load only the ones a recipe names, validate their arguments."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

import pluggy
from pydantic import BaseModel, ValidationError

from slimquant import hookspecs
from slimquant.config.recipe import Recipe, format_validation_error
from slimquant.errors import PluginError, RecipeError

GROUP = "slimquant.plugins"
HOOK_NAMES = ("observe", "smooth", "quantize_weight", "quantize_act", "export")
ALGORITHM_HOOKS = ("observe", "smooth", "quantize_weight", "quantize_act")
DEFAULT_ALGORITHM = "minmax"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    value: str
    distribution: str
    version: str


def installed() -> dict[str, PluginInfo]:
    """Every plugin declared under the entry-point group, without importing any of them."""
    found: dict[str, PluginInfo] = {}
    for ep in entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        found.setdefault(ep.name, PluginInfo(
            ep.name, ep.value, dist.metadata["Name"] if dist else "?", dist.version if dist else "?"))
    return dict(sorted(found.items()))


def _entry_point(name: str) -> EntryPoint:
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not matches:
        known = ", ".join(installed()) or "none"
        raise PluginError(f"unknown algorithm {name!r}; installed algorithms: {known}")
    values = {ep.value for ep in matches}
    if len(values) > 1:
        raise PluginError(f"algorithm {name!r} is declared by several distributions: {sorted(values)}")
    return matches[0]


def load_plugin_class(name: str) -> type:
    ep = _entry_point(name)
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
    return cls


def hooks_of(cls: type) -> list[str]:
    return [h for h in HOOK_NAMES if getattr(getattr(cls, h, None), f"{hookspecs.PROJECT}_impl", None) is not None]


def validate_args(cls: type, args: dict, where: str) -> BaseModel:
    try:
        return cls.Config.model_validate(args)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, where)) from None


class PluginSet:
    """The plugins one recipe uses, registered on one pluggy manager, with each one's role."""

    def __init__(self, plugins: dict[str, object]):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins = plugins
        for name, plugin in plugins.items():
            self.pm.register(plugin, name=name)
        self.pm.check_pending()

    @property
    def hook(self):
        return self.pm.hook

    def with_hook(self, hook: str) -> list[str]:
        return [n for n, p in self.plugins.items() if hook in hooks_of(type(p))]

    def get(self, name: str):
        return self.plugins[name]


@dataclass
class AlgorithmPlan:
    plugins: PluginSet
    smoothers: list[str]
    weight_algorithm: str
    act_algorithm: str


def _single(role: str, candidates: list[str]) -> str:
    if len(candidates) > 1:
        raise RecipeError(f"several {role} algorithms named: {', '.join(candidates)}; name one, "
                          "and pick others per layer with `overrides: [{targets: ..., algorithm: ...}]`")
    return candidates[0] if candidates else DEFAULT_ALGORITHM


def plan_algorithms(recipe: Recipe) -> AlgorithmPlan:
    """Load the named plugins (and minmax when it is needed), validate their arguments, assign roles."""
    specs = {a["name"]: a for a in recipe.algorithms}
    override_algos = [o.algorithm for o in recipe.overrides if o.algorithm]
    names = list(specs) + [n for n in override_algos if n not in specs]
    classes: dict[str, type] = {}
    for i, name in enumerate(names):
        try:
            classes[name] = load_plugin_class(name)
        except PluginError as exc:
            where = f"algorithms[{i}]" if name in specs else "overrides.algorithm"
            raise RecipeError(f"{where}: {exc}") from None
        if not set(ALGORITHM_HOOKS) & set(hooks_of(classes[name])):
            where = f"algorithms[{i}]" if name in specs else "overrides.algorithm"
            raise RecipeError(f"{where}: {name!r} is an output format, not an algorithm; choose it with "
                              "--save-type / save_type")
    for name in override_algos:
        if "quantize_weight" not in hooks_of(classes[name]):
            raise RecipeError(f"overrides.algorithm: {name!r} does not quantize weights")

    weight_algos = [n for n in specs if "quantize_weight" in hooks_of(classes[n]) and n not in override_algos]
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
        plugins[name] = cls(validate_args(cls, specs.get(name, {"name": name}), where))
    smoothers = [n for n in specs if "smooth" in hooks_of(classes[n])]
    return AlgorithmPlan(PluginSet(plugins), smoothers, weight_algorithm, act_algorithm)
