"""The SDK is documented where a plugin author looks: every class and function it exports has a docstring, and the
docstrings of the types a plugin works with name each of their public members (a new member without docs fails)."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest

import slimquant.sdk as sdk
from slimquant.sdk import (
    ActQParams,
    CodebookGrid,
    FakeQuantLinear,
    LayerContext,
    LinearPlan,
    QuantizedWeight,
    Statistic,
    WeightGrid,
)


def own_doc(obj) -> str:
    """The docstring obj itself declares: not inherited, not the signature a dataclass writes in its place."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    if not doc or doc.startswith(f"{obj.__name__}("):
        return ""
    return doc.strip()


def public_members(cls: type, instance=None) -> set[str]:
    """The public names a plugin may use on cls: its dataclass fields, the methods and properties it defines, and
    the attributes an instance gets in __init__."""
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    names |= {n for n, v in vars(cls).items() if callable(v) or isinstance(v, property | classmethod | staticmethod)}
    names |= set(vars(cls).get("__annotations__", {}))
    if instance is not None:
        names |= set(vars(instance))
    return {n for n in names if not n.startswith("_")}


def unmentioned(cls: type, names: set[str]) -> list[str]:
    """The names that cls's own docstring does not mention in backquotes (``name``, `name` or ``name(...)``)."""
    doc = own_doc(cls)
    return sorted(n for n in names if not re.search(rf"`{re.escape(n)}\b", doc))


def sdk_callables() -> list[str]:
    return [n for n in sdk.__all__ if inspect.isclass(getattr(sdk, n)) or inspect.isfunction(getattr(sdk, n))]


@pytest.mark.parametrize("name", sdk_callables())
def test_every_class_and_function_of_the_sdk_has_a_docstring(name):
    assert own_doc(getattr(sdk, name)), f"slimquant.sdk.{name} has no docstring of its own"


def test_the_sdk_docstring_walks_an_author_through_the_roles():
    doc = sdk.__doc__
    assert "Writing a plugin" in doc
    for role in ("Weight algorithm (``WeightQuantizer``)", "Grid (``Grid``)",
                 "Smoother or activation algorithm (``Smoother``, ``ActivationQuantizer``)",
                 "Model transform (``ModelTransform``)", "Exporter (``Exporter``"):
        assert f"\n- {role}" in doc
    mentioned = set(re.findall(r"``(\w+)", doc))
    for name in ("LinearPlan", "LayerContext", "QuantizedWeight", "WeightGrid", "CodebookGrid", "FakeQuantLinear",
                 "Statistic", "effective_group_size", "qrange", "check_plugin", "Feature", "ModelContext",
                 "WeightQuantizer", "ActivationQuantizer", "Smoother", "Grid", "CacheQuantizer", "ModelTransform",
                 "Exporter"):
        assert name in mentioned and name in sdk.__all__


def test_layer_context_documents_every_public_attribute_and_method():
    assert not unmentioned(LayerContext, public_members(LayerContext))


def test_linear_plan_documents_every_field():
    assert not unmentioned(LinearPlan, {f.name for f in dataclasses.fields(LinearPlan)})


def test_weight_grids_document_what_the_quantizers_call():
    uniform = public_members(WeightGrid, WeightGrid(4, True))
    assert not unmentioned(WeightGrid, uniform)
    codebook = CodebookGrid([-1.0, -0.25, 0.5, 1.0], name="test")
    assert not unmentioned(CodebookGrid, public_members(CodebookGrid, codebook) - uniform)
    assert "(code - zero) * scale" in own_doc(WeightGrid)  # the zero-point convention


def test_quantized_weight_and_what_exporters_read_are_documented():
    assert not unmentioned(QuantizedWeight, public_members(QuantizedWeight))
    assert not unmentioned(FakeQuantLinear, {"qweight", "act_qparams", "bias", "in_features", "out_features"})
    assert FakeQuantLinear.qweight.__doc__
    assert not unmentioned(ActQParams, {f.name for f in dataclasses.fields(ActQParams)})


def test_statistic_documents_its_members_and_constructor():
    assert not unmentioned(Statistic, public_members(Statistic))
    assert "__init__" in own_doc(Statistic)


def test_the_check_catches_an_undocumented_member():
    class Documented:
        """Has ``run``."""

        def run(self):
            pass

        def stop(self):
            pass

    assert unmentioned(Documented, public_members(Documented)) == ["stop"]
