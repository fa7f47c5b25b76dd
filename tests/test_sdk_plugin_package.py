"""A third-party plugin package written against `slimquant.sdk` alone: one module holding a data-free weight
algorithm (scales rounded to powers of two) and an exporter (codes and scales as plain .npz arrays), built and
installed by pip as a real distribution, then run through the CLI with no change to slimquant."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

PLUGIN_MODULE = '''
"""Power-of-two weight scales, and an .npz exporter: a slimquant plugin package on slimquant.sdk alone."""
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from slimquant.sdk import Exporter, FakeQuantLinear, QuantizedWeight, WeightQuantizer, hookimpl, qrange, weight_qparams


class Pow2Scales(WeightQuantizer):
    """Round-to-nearest whose scales are powers of two (a shift in integer kernels); data-free."""
    name = "pow2scale"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["pow2scale"] = "pow2scale"

    def __init__(self, config):
        self.config = config

    @hookimpl
    def check(self, plan, name, shape):
        return [] if plan.scheme.weights.symmetric else ["weights.symmetric: pow2scale scales are symmetric"]

    @hookimpl
    def quantize_weight(self, ctx, name, module, args):
        w = module.weight.detach().float()
        scale, _ = weight_qparams(w, args.bits, True, args.group_size, signed=False)  # max|w| / qmax
        scale = torch.exp2(torch.ceil(torch.log2(scale.clamp_min(2.0 ** -24))))  # up: no code leaves the range
        group = args.group_size or w.shape[1]
        qmin, qmax = qrange(args.bits)
        codes = torch.round(w / scale.repeat_interleave(group, dim=1)[:, : w.shape[1]]).clamp(qmin, qmax)
        return QuantizedWeight(codes.to(torch.int8), scale, None, args.bits, args.group_size)


class NpzExporter(Exporter):
    """Every quantized Linear's codes and scales as <name>.codes / <name>.scale in one uncompressed .npz."""
    name = "npz-dump"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["npz-dump"] = "npz-dump"

    def __init__(self, config=None):
        self.config = config

    @hookimpl
    def check(self, plan, name, shape):
        return ["activations: npz-dump holds weights only"] if plan.scheme.activations is not None else []

    @hookimpl
    def export(self, model, output_dir, options):
        arrays = {}
        for name, module in model.named_modules():
            if isinstance(module, FakeQuantLinear):
                qweight = module.qweight
                arrays[f"{name}.codes"] = qweight.codes.cpu().numpy()
                arrays[f"{name}.scale"] = qweight.scale.float().cpu().numpy()
        path = Path(output_dir) / "weights.npz"
        np.savez(path, **arrays)
        return [path]
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "slimquant-pow2scale"
version = "0.1.0"
dependencies = []

[project.entry-points."slimquant.plugins"]
pow2scale = "slimquant_pow2scale:Pow2Scales"

[project.entry-points."slimquant.exporters"]
npz-dump = "slimquant_pow2scale:NpzExporter"

[tool.setuptools]
py-modules = ["slimquant_pow2scale"]
'''


def _require_offline_build_tools() -> None:
    """pip builds the package without a network (--no-build-isolation): setuptools with pyproject metadata (61+),
    and either its own bdist_wheel (70.1+) or the wheel package."""
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec

    try:
        found = tuple(int(part) for part in version("setuptools").split(".")[:2])
    except PackageNotFoundError:
        pytest.skip("setuptools is not installed: the package cannot be built offline")
    if found < (61, 0) or (found < (70, 1) and find_spec("wheel") is None):
        pytest.skip(f"setuptools {'.'.join(map(str, found))} without wheel cannot build the package offline")


@pytest.fixture(scope="module")
def installed_package(tmp_path_factory) -> Path:
    """The package built and installed by pip into a folder of its own (put on PYTHONPATH by the runs)."""
    _require_offline_build_tools()
    source = tmp_path_factory.mktemp("pow2scale-src")
    (source / "slimquant_pow2scale.py").write_text(PLUGIN_MODULE)
    (source / "pyproject.toml").write_text(PYPROJECT)
    target = tmp_path_factory.mktemp("pow2scale-site")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                             "--no-deps", "--no-build-isolation", "--no-index", "--target", str(target), str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(target.glob("slimquant_pow2scale-0.1.0.dist-info"))
    return target


def slimquant_cli(site: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "slimquant", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_the_package_imports_nothing_of_slimquant_but_the_sdk():
    imports = [line.split()[1] for line in PLUGIN_MODULE.splitlines() if line.startswith(("from slimquant", "import "))]
    assert [m for m in imports if m.startswith("slimquant")] == ["slimquant.sdk"]


def test_the_cli_lists_both_plugins_of_the_package(installed_package):
    result = slimquant_cli(installed_package, "plugins")
    assert result.returncode == 0, result.stderr
    assert "pow2scale" in result.stdout and "npz-dump" in result.stdout
    assert "slimquant-pow2scale" in result.stdout


def test_the_cli_quantizes_with_the_package_and_writes_its_format(installed_package, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    result = slimquant_cli(installed_package, "quantize", "--model", tiny_model_dir, "-a", "pow2scale",
                           "--scheme", "W4A16", "--w-sym", "--group-size", 32, "--format", "npz-dump", "--format",
                           "safe_tensor", "-o", out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "data-free" in result.stdout + result.stderr
    with np.load(out / "weights.npz", allow_pickle=False) as arrays:
        scale = arrays["model.layers.0.mlp.down_proj.scale"]
        codes = arrays["model.layers.0.mlp.down_proj.codes"]
    model = tiny_model("llama")
    weight = model.model.layers[0].mlp.down_proj.weight.detach()
    assert codes.shape == tuple(weight.shape) and scale.shape == (weight.shape[0], weight.shape[1] // 32)
    exponents = np.log2(np.abs(scale))
    assert np.array_equal(exponents, np.round(exponents))  # every scale a power of two
    rebuilt = torch.from_numpy(codes).float() * torch.from_numpy(scale).repeat_interleave(32, dim=1)
    assert float((rebuilt - weight).abs().max()) <= float(np.abs(scale).max())


def test_the_packages_plan_time_check_refuses_before_any_work(installed_package, tiny_model_dir, tmp_path):
    result = slimquant_cli(installed_package, "quantize", "--model", tiny_model_dir, "-a", "pow2scale",
                           "--scheme", "W4A16", "-o", tmp_path / "out")
    assert result.returncode == 2
    assert "pow2scale scales are symmetric" in result.stderr
    assert not (tmp_path / "out").exists()
    result = slimquant_cli(installed_package, "quantize", "--model", tiny_model_dir, "-a", "pow2scale",
                           "--scheme", "W8A8", "--format", "npz-dump", "-o", tmp_path / "out")
    assert result.returncode == 2 and "npz-dump holds weights only" in result.stderr


def test_the_check_plugin_kit_accepts_both(installed_package, monkeypatch):
    monkeypatch.syspath_prepend(str(installed_package))
    import slimquant_pow2scale

    from slimquant.sdk import check_plugin

    try:
        check_plugin(slimquant_pow2scale.Pow2Scales, scheme={"weights": {"bits": 4, "group_size": 16}},
                     archs=("llama", "gpt2"))
        check_plugin(slimquant_pow2scale.NpzExporter, scheme="W8A16", archs=("llama",))
    finally:
        sys.modules.pop("slimquant_pow2scale", None)
