"""The import boundary, enforced in CI: import-linter's contracts in the root pyproject.toml ([tool.importlinter])
hold, name every core module and every plugin, and catch a plugin that imports slimquant around slimquant.sdk."""

import json
import os
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import slimquant

pytest.importorskip("importlinter", reason="import-linter is a test tool: bash scripts/install.sh --dev installs it")

ROOT = Path(__file__).resolve().parents[1]
SDK = "slimquant.sdk"
# Plugin packages written by the test (never installed), each importing one thing, and whether the contracts allow it.
STRAYS = {
    "slimquant_stray_sdk": ("from slimquant.sdk import hookimpl", True),
    "slimquant_stray_core": ("from slimquant.quant.math import round_to_nearest", False),
    "slimquant_stray_root": ("from slimquant import hookimpl", False),
    "slimquant_stray_plugin": ("from slimquant_gptq.gptq import gptq_quantize", False),
}


def config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def contract(options: dict, kind: str) -> dict:
    (found,) = [c for c in options["contracts"] if c["type"] == kind]
    return found


def plugin_packages() -> set[str]:
    return {p.name for p in ROOT.glob("plugins/*/src/*") if (p / "__init__.py").is_file()}


def lint_imports(config_file: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    command = "from importlinter.cli import lint_imports_command; lint_imports_command()"  # the lint-imports script
    return subprocess.run([sys.executable, "-c", command, "--config", str(config_file), "--no-cache"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def write_config(path: Path, options: dict) -> None:
    """`options` as a [tool.importlinter] TOML file (its values are strings, booleans and lists of strings, which
    JSON writes as TOML reads them)."""
    lines = ["[tool.importlinter]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in options.items() if key != "contracts"]
    for c in options["contracts"]:
        lines += ["", "[[tool.importlinter.contracts]]", *(f"{key} = {json.dumps(value)}" for key, value in c.items())]
    path.write_text("\n".join(lines) + "\n")


def test_contracts_hold():
    result = lint_imports(ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_contracts_name_every_plugin():
    options, plugins = config(), plugin_packages()
    assert set(options["root_packages"]) == plugins | {"slimquant"}
    assert set(contract(options, "forbidden")["source_modules"]) == plugins
    assert set(contract(options, "independence")["modules"]) == plugins


def test_plugins_are_forbidden_every_core_module_but_the_sdk():
    core = {f"slimquant.{m.name}" for m in pkgutil.iter_modules(slimquant.__path__)}
    assert SDK in core
    assert set(contract(config(), "forbidden")["forbidden_modules"]) == core - {SDK}


def test_contracts_catch_a_plugin_importing_around_the_sdk(tmp_path):
    options = config()
    for package, (line, _) in STRAYS.items():
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(f"{line}\n")
        options["root_packages"].append(package)
        contract(options, "forbidden")["source_modules"].append(package)
        contract(options, "independence")["modules"].append(package)
    write_config(tmp_path / "importlinter.toml", options)
    result = lint_imports(tmp_path / "importlinter.toml", pythonpath=tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    for package, (line, allowed) in STRAYS.items():
        assert (f"{package} -> " not in result.stdout) == allowed, f"{line}\n{result.stdout}"
