"""The core holds no plugin's name or default: what it says and chooses comes from what the plugins declare."""

import ast
import re
from pathlib import Path

import pytest

from slimquant.config.recipe import Recipe
from slimquant.errors import RecipeError
from slimquant.plugins import plan_algorithms

CORE = Path(__file__).resolve().parents[1] / "core" / "src" / "slimquant"
# The algorithms and output formats that ship as plugins. compat/ translates other tools' option values and may
# name what to install for them; GGUF as an *input* model is the core's loader, so "gguf" is not listed.
PLUGIN_NAMES = ["gptq", "nf4", "kquant", "smoothquant", "awq", "hqq", "kvcache", "piecewise", "compressed-tensors"]


def _code_strings(path: Path):
    """The string literals of a module that are not docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_no_plugin_is_named_in_the_cores_code_or_messages():
    found = [f"{path.relative_to(CORE)}:{line}: {name!r} in {text[:60]!r}"
             for path in sorted(CORE.rglob("*.py")) if "compat" not in path.parts
             for line, text in _code_strings(path)
             for name in PLUGIN_NAMES if re.search(rf"\b{re.escape(name)}\b", text, re.IGNORECASE)]
    assert not found, "\n".join(found)


def test_the_cache_algorithm_defaults_to_the_one_installed():
    pytest.importorskip("slimquant_kvcache")
    plan = plan_algorithms(Recipe.model_validate({"kv_cache": {"bits": 8}}))
    assert plan.cache_algorithm == "kvcache"


def test_without_an_installed_cache_algorithm_the_error_says_to_name_one(monkeypatch):
    from slimquant import plugins

    monkeypatch.setattr(plugins, "installed", lambda group=plugins.ALGORITHMS: {})
    with pytest.raises(RecipeError, match=r"kv_cache.algorithm: name the plugin that quantizes the attention cache "
                                          r"\(none is installed\)"):
        plan_algorithms(Recipe.model_validate({"kv_cache": {"bits": 8}}))
