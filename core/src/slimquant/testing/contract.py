"""`check_plugin`: the contract check a plugin's own tests call on its class (slimquant's plugins and third parties').

    from slimquant.testing import check_plugin

    def test_contract():
        check_plugin(MyAlgo, args={"strength": 0.5}, scheme="W4A16")

For an algorithm it checks the declaration (name, a Config that refuses unknown keys, hooks whose signatures match the
hook specs, no method named after a hook left without @hookimpl, a hook that gives it a role in a plan, capabilities
of the right types, the entry point when one is installed), then quantizes a tiny random model of each test
architecture with the plugin — from calibration samples when the recipe requires data, data-free otherwise — and
checks that every planned Linear became a fake-quantized Linear with finite logits, that save -> load gives the same
logits, and, for a plugin that declares `distributed`, that it keeps nothing but `Statistic`s in `ctx.state`. A
data-free weight algorithm is then run again on every architecture behind smoothquant, when that plugin is installed
and the recipe is not calibrated already: the calibrated path, on weights a smoother rewrote.

For an exporter (a class with an `export` hook, installed under `slimquant.exporters`) it checks the declaration, then
quantizes a tiny model of each architecture with `scheme` (and `extra_algorithms`), saves it with the exporter
through `save_quantized` into a temporary folder, checks that the exporter wrote at least one file and nothing outside
its output (nor into the current directory), and reloads the output when slimquant can load it (a
`quant_model_description_*.json` with safetensors: the safe_tensor family), comparing the logits.
"""

from __future__ import annotations

import tempfile
import typing
from collections.abc import Iterable
from pathlib import Path

import torch
from pydantic import BaseModel

from slimquant import hookspecs
from slimquant.plugins import (
    ALGORITHM_HOOKS,
    ALGORITHMS,
    EXPORTERS,
    HOOK_NAMES,
    ROLE_HOOKS,
    PluginSet,
    hooks_of,
    installed,
    load_plugin_class,
    requires_calibration_data,
)
from slimquant.testing.models import ARCHS, tiny_model, token_samples

ALIAS_KEYS = ("msmodelslim.w_method", "msmodelslim.anti_method", "msmodelslim.sparse", "paddleslim")
CALIBRATED_COMPANION = "smoothquant"  # the calibrated plugin a data-free weight algorithm is also run behind
FLAGS = ("requires_calibration_data", "sequential", "distributed", "row_parallel")


class ContractError(AssertionError):
    """The plugin breaks the contract in slimquant.hookspecs."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ContractError(message)


def check_declaration(cls: type, group: str = ALGORITHMS) -> None:
    """Name, Config, hooks and capabilities, as the runtime will read them."""
    name = getattr(cls, "name", None)
    spelled = name.replace("-", "_") if group == EXPORTERS and isinstance(name, str) else name  # "compressed-tensors"
    _require(isinstance(name, str) and spelled.isidentifier(), f"{cls.__name__}.name must be an identifier string"
             + (" (hyphens allowed)" if group == EXPORTERS else ""))
    config = getattr(cls, "Config", None)
    _require(isinstance(config, type) and issubclass(config, BaseModel), f"{name}: Config must be a pydantic model")
    field = config.model_fields.get("name")
    _require(field is not None and typing.get_args(field.annotation) == (name,),
             f"{name}: Config.name must be Literal[{name!r}]")
    _require(config.model_config.get("extra") == "forbid",
             f'{name}: Config must refuse unknown keys: add `model_config = ConfigDict(extra="forbid")` to it '
             "(pydantic's ConfigDict), so that a misspelt argument is named instead of ignored")
    hooks = hooks_of(cls)
    unmarked = [h for h in HOOK_NAMES if h not in hooks and callable(getattr(cls, h, None))]
    _require(not unmarked, f"{name}: {', '.join(unmarked)} is not marked @hookimpl: the runtime never calls it")
    expected = ("export",) if group == EXPORTERS else ALGORITHM_HOOKS
    _require(bool(set(hooks) & set(expected)), f"{name}: implements none of {', '.join(expected)}")
    if group == ALGORITHMS:
        _require(bool(set(hooks) & set(ROLE_HOOKS)),
                 f"{name}: implements only {', '.join(hooks)}, so it gets no role in a plan: a weight algorithm "
                 f"needs quantize_weight, a smoother smooth (one of {', '.join(ROLE_HOOKS)})")
    PluginSet({name: cls(config(name=name))})  # pluggy checks each hook's arguments against its spec
    for flag in FLAGS:
        _require(isinstance(getattr(cls, flag, False), bool), f"{name}.{flag} must be a bool")
    observes = getattr(cls, "observes", None)
    _require(observes is None or callable(observes), f"{name}.observes must be a method observes(plan) -> bool")
    aliases = getattr(cls, "aliases", {})
    _require(isinstance(aliases, dict) and all(k in ALIAS_KEYS and isinstance(v, str) for k, v in aliases.items()),
             f"{name}.aliases must map some of {', '.join(ALIAS_KEYS)} to strings")
    if name in installed(group):
        _require(load_plugin_class(name, group) is cls, f"{name}: the installed entry point names another class")
    _require(hookspecs.CONTRACT_VERSION == 2, "this check is for contract version 2")


def _recipe(algorithms: list, scheme: str | dict) -> dict:
    recipe = {"algorithms": algorithms, "runtime": {"progress": False}}
    recipe.update({"scheme": scheme} if isinstance(scheme, str) else scheme)
    return recipe


def _needs_data(recipe: dict) -> bool:
    from slimquant.config.recipe import Recipe
    from slimquant.plugins import plan_algorithms

    parsed = Recipe.parse(recipe)
    algorithms = plan_algorithms(parsed)
    return algorithms.requires_calibration_data(algorithms.scheme_plans(parsed))


@torch.no_grad()
def check_run(cls: type, args: dict | None = None, scheme: str | dict = "W4A16", archs: Iterable[str] = ARCHS,
              extra_algorithms: list | None = None) -> dict[str, float]:
    """Quantize a tiny model of each architecture with the plugin, save and reload it; return the max |logit
    change| quantization caused per architecture (a plugin's own test can bound it)."""
    from slimquant import quantize
    from slimquant.export import save_quantized
    from slimquant.loader import load_quantized
    from slimquant.quant.fake_linear import FakeQuantLinear
    from slimquant.runtime.pipeline import statistics_checked

    recipe = _recipe([*(extra_algorithms or []), {"name": cls.name, **(args or {})}], scheme)
    samples = token_samples(4, 16) if _needs_data(recipe) else None
    ids = token_samples(1, 16, seed=99)[0]
    changes = {}
    for arch in archs:
        model = tiny_model(arch)
        before = model(ids).logits
        with statistics_checked():  # one process refuses the state that several would leave uncombined
            report = quantize(model, recipe, samples=samples)
        planned = {n for n, p in report.plans.items() if p is not None}
        fakes = {n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
        _require(planned and planned == fakes, f"{cls.name} on {arch}: planned Linears {len(planned)}, "
                                               f"fake-quantized {len(fakes)}")
        after = model(ids).logits
        _require(bool(torch.isfinite(after).all()), f"{cls.name} on {arch}: non-finite logits")
        with tempfile.TemporaryDirectory() as tmp:
            save_quantized(model, f"{tmp}/out", linear_types=report.linear_types())
            reloaded = load_quantized(tiny_model(arch), f"{tmp}/out")
            _require(torch.equal(reloaded(ids).logits, after), f"{cls.name} on {arch}: save -> load changes logits")
        changes[arch] = float((after - before).abs().max())
    return changes


def _calibrated_companion(cls: type, args: dict | None, scheme: str | dict,
                          extra_algorithms: list | None) -> str | None:
    """The calibrated plugin a data-free weight algorithm is run behind as well, when installed and when the recipe
    is not calibrated already."""
    if requires_calibration_data(cls) or "quantize_weight" not in hooks_of(cls):
        return None
    if CALIBRATED_COMPANION not in installed(ALGORITHMS):
        return None
    alone = _recipe([*(extra_algorithms or []), {"name": cls.name, **(args or {})}], scheme)
    return None if _needs_data(alone) else CALIBRATED_COMPANION


def _entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _loadable(output: Path) -> bool:
    """Whether slimquant's loader reads this output (its description and safetensors: the safe_tensor family)."""
    return any(output.glob("quant_model_description_*.json")) and any(output.glob("*.safetensors"))


@torch.no_grad()
def check_exporter(cls: type, scheme: str | dict = "W8A16", archs: Iterable[str] = ARCHS,
                   algorithms: list | None = None) -> dict[str, list[str]]:
    """Quantize a tiny model of each architecture with `scheme` (and `algorithms`: minmax when none), export it with
    the exporter through save_quantized into a temporary folder, reload it when slimquant can; return the files
    written per architecture (relative to the output)."""
    from slimquant import quantize
    from slimquant.config.recipe import Recipe
    from slimquant.export import save_quantized
    from slimquant.export.atomic import OUTPUT_MARKER
    from slimquant.loader import load_quantized
    from slimquant.plugins import plan_algorithms

    _require(cls.name in installed(EXPORTERS), f"{cls.name}: not installed under the entry-point group {EXPORTERS} "
                                               "(save_quantized finds exporters there): install its package")
    recipe = _recipe(list(algorithms or []), scheme)
    plan_algorithms(Recipe.parse(recipe), [cls.name])  # the exporter's own check of the scheme, before any work
    samples = token_samples(4, 16) if _needs_data(recipe) else None
    ids = token_samples(1, 16, seed=99)[0]
    written = {}
    for arch in archs:
        model = tiny_model(arch)
        report = quantize(model, recipe, samples=samples)
        after = model(ids).logits
        here = _entries(Path.cwd())
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            save_quantized(model, out, save_type=cls.name, linear_types=report.linear_types())  # refuses strays
            _require(_entries(Path(tmp)) == {"out"}, f"{cls.name} on {arch}: wrote beside its output folder: "
                                                     f"{sorted(_entries(Path(tmp)) - {'out'})}")
            files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != OUTPUT_MARKER)
            _require(bool(files), f"{cls.name} on {arch}: the export wrote no file")
            if _loadable(out):
                reloaded = load_quantized(tiny_model(arch), out)
                _require(torch.equal(reloaded(ids).logits, after), f"{cls.name} on {arch}: export -> load changes "
                                                                   "logits")
        _require(_entries(Path.cwd()) == here, f"{cls.name} on {arch}: wrote into the current directory: "
                                               f"{sorted(_entries(Path.cwd()) - here)}")
        written[arch] = files
    return written


def check_plugin(cls: type, args: dict | None = None, scheme: str | dict = "W4A16", archs: Iterable[str] = ARCHS,
                 extra_algorithms: list | None = None) -> dict:
    """The whole contract check: declaration, then a run on every test architecture (see the module docstring).
    Returns, for an algorithm, the max |logit change| per architecture (`check_run`); for an exporter, the files it
    wrote per architecture (`check_exporter`; `extra_algorithms` are then the recipe's algorithms). Raises
    ContractError (or the runtime's own PluginError / RecipeError)."""
    archs = list(archs)
    if "export" in hooks_of(cls):
        check_declaration(cls, EXPORTERS)
        return check_exporter(cls, scheme, archs, extra_algorithms)
    check_declaration(cls)
    changes = check_run(cls, args, scheme, archs, extra_algorithms)
    companion = _calibrated_companion(cls, args, scheme, extra_algorithms)
    if companion is not None:
        check_run(cls, args, scheme, archs, [companion, *(extra_algorithms or [])])
    return changes
