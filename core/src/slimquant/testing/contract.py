"""`check_plugin`: the contract check a plugin's own tests call on its class (slimquant's plugins and third parties').

    from slimquant.testing import check_plugin

    def test_contract():
        check_plugin(MyAlgo, args={"strength": 0.5}, scheme="W4A16")

It checks the declaration (name, Config, hooks whose signatures match the hook specs, capabilities of the right
types, the entry point when one is installed), then quantizes a tiny random model of each test architecture with
the plugin — from calibration samples when it requires data, data-free otherwise — and checks that every planned
Linear became a fake-quantized Linear with finite logits, and that save -> load gives the same logits.
"""

from __future__ import annotations

import tempfile
import typing
from collections.abc import Iterable

import torch
from pydantic import BaseModel

from slimquant import hookspecs
from slimquant.plugins import ALGORITHM_HOOKS, ALGORITHMS, EXPORTERS, PluginSet, hooks_of, installed, load_plugin_class
from slimquant.testing.models import ARCHS, tiny_model, token_samples

ALIAS_KEYS = ("msmodelslim.w_method", "msmodelslim.anti_method", "msmodelslim.sparse", "paddleslim")


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
    hooks = hooks_of(cls)
    expected = ("export",) if group == EXPORTERS else ALGORITHM_HOOKS
    _require(bool(set(hooks) & set(expected)), f"{name}: implements none of {', '.join(expected)}")
    PluginSet({name: cls(config(name=name))})  # pluggy checks each hook's arguments against its spec
    for flag in ("requires_calibration_data", "sequential"):
        _require(isinstance(getattr(cls, flag, False), bool), f"{name}.{flag} must be a bool")
    observes = getattr(cls, "observes", None)
    _require(observes is None or callable(observes), f"{name}.observes must be a method observes(plan) -> bool")
    aliases = getattr(cls, "aliases", {})
    _require(isinstance(aliases, dict) and all(k in ALIAS_KEYS and isinstance(v, str) for k, v in aliases.items()),
             f"{name}.aliases must map some of {', '.join(ALIAS_KEYS)} to strings")
    if name in installed(group):
        _require(load_plugin_class(name, group) is cls, f"{name}: the installed entry point names another class")
    _require(hookspecs.CONTRACT_VERSION == 2, "this check is for contract version 2")


@torch.no_grad()
def check_run(cls: type, args: dict | None = None, scheme: str | dict = "W4A16", archs: Iterable[str] = ARCHS,
              extra_algorithms: list | None = None) -> dict[str, float]:
    """Quantize a tiny model of each architecture with the plugin, save and reload it; return the max |logit
    change| quantization caused per architecture (a plugin's own test can bound it)."""
    from slimquant import quantize
    from slimquant.export import save_quantized
    from slimquant.loader import load_quantized
    from slimquant.quant.fake_linear import FakeQuantLinear

    spec = {"name": cls.name, **(args or {})}
    recipe = {"algorithms": [*(extra_algorithms or []), spec], "runtime": {"progress": False}}
    recipe.update({"scheme": scheme} if isinstance(scheme, str) else scheme)
    needs_data = bool(getattr(cls, "requires_calibration_data", False))
    ids = token_samples(1, 16, seed=99)[0]
    changes = {}
    for arch in archs:
        model = tiny_model(arch)
        before = model(ids).logits
        report = quantize(model, recipe, samples=token_samples(4, 16) if needs_data else None)
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


def check_plugin(cls: type, args: dict | None = None, scheme: str | dict = "W4A16", archs: Iterable[str] = ARCHS,
                 extra_algorithms: list | None = None) -> dict[str, float]:
    """The whole contract check: declaration, then a run on every test architecture. Raises ContractError."""
    check_declaration(cls)
    return check_run(cls, args, scheme, archs, extra_algorithms)
