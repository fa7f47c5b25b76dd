"""Several processes (torch.distributed, gloo): each calibrates on its share of the samples, statistics are reduced,
each quantizes whole clusters of Linears (q/k/v, o, gate/up, down on a Llama layer) or, with fewer clusters than two
per process, its block of every Linear's rows; the result is the single-process one up to float rounding."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model, token_samples

import slimquant
from slimquant.errors import CalibrationError, RecipeError
from slimquant.runtime import distributed
from slimquant.runtime.distributed import Ranks
from slimquant.runtime.pipeline import LayerwiseQuantizer

GPTQ = """scheme: W4A16
weights: {bits: 4, group_size: 16, symmetric: true}
algorithms: [{name: gptq, act_order: false, mse: false}]
runtime: {calibration_dtype: model}
"""
GPTQ_SEQUENTIAL = """scheme: W4A16
weights: {bits: 4, group_size: 16, symmetric: false}
algorithms: [{name: gptq, act_order: false, mse: false, true_sequential: true}]
runtime: {calibration_dtype: model}
"""
W8A8_SQ = """scheme: W8A8
algorithms: [smoothquant, minmax]
runtime: {calibration_dtype: model}
"""


def quantize(model_dir, calib, recipe_file, output, processes: int):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                "--master-port", str(29500 + os.getpid() % 1000)] if processes > 1 else [sys.executable]
    command = [*launcher, "-m", "slimquant", "quantize", str(recipe_file), "--model", str(model_dir),
               "--calib-file", str(calib), "--num-samples", "8", "--seqlen", "16", "--kl-samples", "0",
               "-o", str(output)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.parametrize("recipe", [GPTQ, GPTQ_SEQUENTIAL, W8A8_SQ],
                         ids=["gptq-whole-linears", "gptq-sequential-row-blocks", "smoothquant-w8a8"])
def test_two_processes_quantize_as_one_does(tiny_model_dir, calib_text_file, tmp_path, recipe):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(recipe)
    quantize(tiny_model_dir, calib_text_file, recipe_file, tmp_path / "one", 1)
    log = quantize(tiny_model_dir, calib_text_file, recipe_file, tmp_path / "two", 2)
    assert "processes: 2" in log
    (one,) = (tmp_path / "one").glob("*.safetensors")
    (two,) = (tmp_path / "two").glob("*.safetensors")
    a, b = load_file(str(one)), load_file(str(two))
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():  # scales, norms: the sums of two processes round differently
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key  # the codes


def test_row_blocks_cover_every_row_once():
    for rows in (1, 7, 64, 101):
        for size in (1, 2, 3, 8):
            blocks = [Ranks(r, size).row_block(rows) for r in range(size)]
            covered = [i for block in blocks for i in range(rows)[block]]
            assert covered == list(range(rows))
            assert [len(range(rows)[b]) for b in blocks] == Ranks(0, size).block_sizes(rows)


def test_clusters_go_costliest_first_to_the_least_loaded_process():
    clusters = [["qkv"], ["o"], ["gate", "up"], ["down"]]
    owners = distributed.assign_owners(clusters, [73.0, 51.0, 195.0, 237.0], Ranks(0, 2))
    assert owners == {"down": 0, "gate": 1, "up": 1, "qkv": 1, "o": 0}
    three = distributed.assign_owners(clusters, [73.0, 51.0, 195.0, 237.0], Ranks(0, 3))
    assert three == {"down": 0, "gate": 1, "up": 1, "qkv": 2, "o": 2}


@pytest.fixture
def two_processes(monkeypatch):
    monkeypatch.setattr(distributed, "current", lambda: Ranks(0, 2))
    monkeypatch.setattr(distributed, "agree", lambda *args: None)  # one process playing two has no one to ask


@pytest.mark.parametrize("algorithms", [["awq"], ["hqq"], ["sparse"]])
def test_plugins_that_do_not_declare_it_are_refused_on_several_processes(two_processes, algorithms):
    recipe = slimquant.Recipe.parse({"scheme": "W4A16", "algorithms": algorithms})
    with pytest.raises(RecipeError, match=rf"(?s)2 processes .*plugin '{algorithms[0]}' does not declare"):
        LayerwiseQuantizer(tiny_model("llama"), recipe, torch.device("cpu"))


def test_checkpoints_are_refused_on_several_processes(two_processes, tmp_path):
    recipe = slimquant.Recipe.parse({"scheme": "W4A16", "algorithms": ["gptq"],
                                     "runtime": {"checkpoint_dir": str(tmp_path / "ckpt")}})
    with pytest.raises(RecipeError, match="resume checkpoints are written by one process"):
        LayerwiseQuantizer(tiny_model("llama"), recipe, torch.device("cpu"))


def test_fewer_samples_than_processes_is_refused(two_processes):
    recipe = slimquant.Recipe.parse({"scheme": "W4A16", "algorithms": ["gptq"]})
    quantizer = LayerwiseQuantizer(tiny_model("llama"), recipe, torch.device("cpu"))
    with pytest.raises(CalibrationError, match="1 calibration samples for 2 processes"):
        quantizer.run(token_samples(1, 16))
