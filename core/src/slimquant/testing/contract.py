"""`check_plugin`: the contract check a plugin's own tests call on its class (slimquant's plugins and third parties').

    from slimquant.testing import check_plugin

    def test_contract():
        check_plugin(MyAlgo, args={"strength": 0.5}, scheme="W4A16")

For an algorithm it checks the declaration (name, a Config that refuses unknown keys, hooks whose signatures match the
hook specs, no method named after a hook left without @hookimpl, a role base with its hook for each role it takes and
no hook outside them, capabilities of the right types and no misspelt one, the entry point when one is installed),
then quantizes a tiny random model of each test
architecture with the plugin — from calibration samples when the recipe requires data, data-free otherwise — and
checks that every planned Linear became a fake-quantized Linear with finite logits, that save -> load gives the same
logits, and, for a plugin that declares `distributed`, that it keeps nothing but `Statistic`s in `ctx.state`. A
data-free weight algorithm is then run again on every architecture behind an installed smoother that needs calibration
data, when the recipe is not calibrated already: the calibrated path, on weights a smoother rewrote.

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
from slimquant.errors import PluginError
from slimquant.plugins import (
    ALGORITHMS,
    EXPORTERS,
    HOOK_NAMES,
    PluginSet,
    hooks_of,
    installed,
    load_plugin_class,
    requires_calibration_data,
)
from slimquant.roles import Smoother, capability_problems, role_problems
from slimquant.testing.models import ARCHS, tiny_model, token_samples


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
    problems = role_problems(cls, hooks, exporter=group == EXPORTERS)
    _require(not problems, "; ".join(problems))
    plugin = cls(config(name=name))
    PluginSet({name: plugin})  # pluggy checks each hook's arguments against its spec
    problems = capability_problems(plugin)
    _require(not problems, "; ".join(problems))
    if name in installed(group):
        _require(load_plugin_class(name, group) is cls, f"{name}: the installed entry point names another class")
    _require(hookspecs.CONTRACT_VERSION == 3, "this check is for contract version 3")


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


def calibrated_smoother() -> str | None:
    """An installed smoother that needs calibration data: of those, one that declares `distributed` (its state is
    statistics only, the lightest) before the others, then by name."""
    found = []
    for name in installed(ALGORITHMS):
        try:
            cls = load_plugin_class(name)
        except PluginError:
            continue
        if issubclass(cls, Smoother) and cls.requires_calibration_data and "quantize_weight" not in hooks_of(cls):
            found.append((not cls.distributed, name))
    return min(found)[1] if found else None


def _calibrated_companion(cls: type, args: dict | None, scheme: str | dict,
                          extra_algorithms: list | None) -> str | None:
    """The calibrated smoother a data-free weight algorithm is run behind as well, when one is installed and the
    recipe is not calibrated already."""
    if requires_calibration_data(cls) or "quantize_weight" not in hooks_of(cls):
        return None
    companion = calibrated_smoother()
    if companion is None:
        return None
    alone = _recipe([*(extra_algorithms or []), {"name": cls.name, **(args or {})}], scheme)
    return None if _needs_data(alone) else companion


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
