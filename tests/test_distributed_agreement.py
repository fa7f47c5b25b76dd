"""Several processes (torch.distributed) agree on what they run before any work, or every one stops naming the
difference; a collective that waits longer than runtime.collective_timeout fails in one line; SIGTERM ends a process
blocked in a collective; resume checkpoints are refused up front under torchrun.

The processes are started one by one with torchrun's environment (not by torchrun, which would SIGTERM the others as
soon as one fails), so that each one's exit code and message can be checked. Each run stops within a minute even
when something hangs: small collective timeouts, and a timeout on every subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_models import tiny_model
from tiny_tokenizer import build_tokenizer
from typer.testing import CliRunner

import slimquant
from slimquant.cli import app
from slimquant.errors import ProcessGroupError, RecipeError
from slimquant.plugins import plan_algorithms
from slimquant.runtime import distributed
from slimquant.runtime.distributed import Ranks
from slimquant.runtime.fingerprint import job_parts

WAIT_SECONDS = 60  # for any one process
PEER = """import sys, time, datetime, torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
time.sleep(float(sys.argv[1]))  # joined, then never answers (or stops at once with 0)
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(port: int, rank: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}


class Process:
    """One rank, its output in a file (no pipe to fill up)."""

    def __init__(self, command: list[str], port: int, rank: int, log: Path):
        self.log = log
        self.started = time.monotonic()
        with log.open("w") as out:
            self.popen = subprocess.Popen(command, env=rank_env(port, rank), stdout=out, stderr=subprocess.STDOUT)

    def wait(self) -> int:
        try:
            return self.popen.wait(timeout=WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            pytest.fail(f"a process ran longer than {WAIT_SECONDS} s:\n{self.text()[-2000:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def slimquant_rank(args: dict[str, str], port: int, rank: int, log: Path, *flags: str) -> Process:
    command = [sys.executable, "-m", "slimquant", "quantize", *[str(x) for kv in args.items() for x in kv], *flags]
    return Process(command, port, rank, log)


def peer_rank(tmp_path: Path, port: int, seconds: float) -> Process:
    script = tmp_path / "peer.py"
    script.write_text(PEER)
    return Process([sys.executable, str(script), str(seconds)], port, 1, tmp_path / "peer.log")


def recipe_file(tmp_path: Path, minutes: float) -> Path:
    path = tmp_path / f"timeout-{minutes}.yaml"
    path.write_text(f"runtime: {{collective_timeout: {minutes}}}\n")
    return path


@pytest.fixture
def base_args(tiny_model_dir, calib_text_file, tmp_path) -> dict[str, str]:
    return {"--model": str(tiny_model_dir), "--calib-file": str(calib_text_file), "--num-samples": "8",
            "--seqlen": "16", "--kl-samples": "0", "--scheme": "W4A16", "--group-size": "16", "-a": "gptq",
            "-o": str(tmp_path / "out")}


@pytest.fixture(scope="module")
def other_models(tmp_path_factory) -> dict[str, Path]:
    """A Llama with other weights, and a Qwen2: another model for process 1."""
    paths = {}
    for name, arch, seed in (("other-weights", "llama", 1), ("other-architecture", "qwen2", 0)):
        path = tmp_path_factory.mktemp(name)
        model = tiny_model(arch, seed=seed)
        model.config.bos_token_id, model.config.eos_token_id = 1, 2
        model.save_pretrained(path)
        build_tokenizer().save_pretrained(path)
        paths[name] = path
    return paths


# -- processes that differ ------------------------------------------------------------------------------------------

MISMATCHES = {
    "group-size": ({"--group-size": "8"}, "recipe (weights.group_size: 8 vs 16 on process 0)"),
    "scheme": ({"--scheme": "W8A16"}, 'recipe (scheme: "W8A16" vs "W4A16" on process 0)'),
    "ignore": ({"--ignore": "re:.*o_proj"}, 'recipe (ignore: ["re:.*o_proj"] vs [] on process 0)'),
    "num-samples": ({"--num-samples": "4"}, "recipe (calibration.num_samples: 4 vs 8 on process 0)"),
    "algorithm": ({"-a": "minmax"}, 'recipe (algorithms[0].name: "minmax" vs "gptq" on process 0)'),
    "model-weights": ({"--model": "other-weights"}, "model weights."),
    "model-architecture": ({"--model": "other-architecture"},
                           'model config (architectures[0]: "Qwen2ForCausalLM" vs "LlamaForCausalLM" on process 0'),
}


@pytest.mark.parametrize("change", MISMATCHES, ids=list(MISMATCHES))
def test_processes_that_differ_all_stop_naming_the_difference(base_args, other_models, tmp_path, change):
    differing, expected = MISMATCHES[change]
    if "--model" in differing:
        differing = {"--model": str(other_models[differing["--model"]])}
    timeout = str(recipe_file(tmp_path, 0.5))
    port = free_port()
    ranks = [slimquant_rank(args, port, rank, tmp_path / f"rank{rank}.log", timeout)
             for rank, args in enumerate([base_args, {**base_args, **differing}])]
    try:
        codes = [rank.wait() for rank in ranks]
    finally:
        for rank in ranks:
            rank.stop()
    for rank, code in zip(ranks, codes, strict=True):
        assert code == 2, rank.text()[-2000:]
        assert f"error: process 1 differs from process 0 in: {expected}" in rank.text().replace("\n", ""), \
            rank.text()[-2000:]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary output either


def test_differences_name_every_differing_process_once(monkeypatch):
    """With more processes, those that differ alike are named together, each difference field by field."""
    same = {"recipe": {"weights": {"group_size": 64, "bits": 4}}, "model weights": "a" * 64}
    other = {"recipe": {"weights": {"group_size": 128, "bits": 4}}, "model weights": "b" * 64}
    monkeypatch.setattr(distributed, "current", lambda: Ranks(0, 4))
    monkeypatch.setattr(distributed, "_all_gather_json", lambda *args: [same, other, same, other])
    with pytest.raises(RecipeError) as caught:
        distributed.agree(same, "the test", None)
    assert str(caught.value).startswith("processes 1, 3 differ from process 0 in: recipe (weights.group_size: 128 "
                                        "vs 64 on process 0), model weights. ")
    monkeypatch.setattr(distributed, "_all_gather_json", lambda *args: [same] * 4)
    distributed.agree(same, "the test", None)  # all alike: nothing raised


def test_where_each_process_finds_its_files_is_not_compared():
    """Processes on several machines may find the model and data in other places; their contents are compared."""
    def parts(**model):
        recipe = slimquant.Recipe.parse({"model": model, "scheme": "W4A16",
                                         "calibration": {"source": "text_file", "path": f"{model['path']}.txt"},
                                         "runtime": {"collective_timeout": model.pop("timeout", 10)}})
        return job_parts(recipe, plan_algorithms(recipe))

    assert parts(path="/a/model", device="cpu") == parts(path="/b/model", device="auto", timeout=1)
    assert parts(path="/a/model", dtype="float16") != parts(path="/a/model")


# -- collectives that wait too long, processes that stop ------------------------------------------------------------


def test_a_process_that_never_answers_stops_the_others_within_the_timeout(base_args, tmp_path):
    port = free_port()
    peer = peer_rank(tmp_path, port, 50)
    rank0 = slimquant_rank(base_args, port, 0, tmp_path / "rank0.log", str(recipe_file(tmp_path, 0.1)))
    try:
        assert rank0.wait() == 2, rank0.text()[-2000:]
        assert time.monotonic() - rank0.started < 40  # 6 s of timeout and the start, not gloo's 30 minutes
    finally:
        peer.stop()
    assert ("error: process 0: no answer from the other processes within 0.1 minutes (runtime.collective_timeout) "
            "in the comparison of the recipe and versions; another process stopped or is stuck") in rank0.text()
    assert not (tmp_path / "out").exists()


def test_a_process_that_stops_stops_the_others_at_once(base_args, tmp_path):
    port = free_port()
    peer = peer_rank(tmp_path, port, 0)
    rank0 = slimquant_rank(base_args, port, 0, tmp_path / "rank0.log", str(recipe_file(tmp_path, 5)))
    try:
        assert rank0.wait() == 2, rank0.text()[-2000:]
    finally:
        peer.stop()
    assert "error: process 0: another process stopped during the comparison of the recipe and versions" \
        in rank0.text()


def test_sigterm_ends_a_process_blocked_in_a_collective(base_args, tmp_path):
    port = free_port()
    peer = peer_rank(tmp_path, port, 50)
    rank0 = slimquant_rank(base_args, port, 0, tmp_path / "rank0.log", str(recipe_file(tmp_path, 5)), "-v")
    try:
        while "process 0 of 2" not in rank0.text():  # joined: the comparison follows at once
            assert rank0.popen.poll() is None, rank0.text()[-2000:]
            assert time.monotonic() - rank0.started < WAIT_SECONDS
            time.sleep(0.2)
        time.sleep(1)
        sent = time.monotonic()
        rank0.popen.send_signal(signal.SIGTERM)
        assert rank0.wait() == 130, rank0.text()[-2000:]
        assert time.monotonic() - sent < distributed.UNWIND_SECONDS + 5  # not the 5-minute timeout
    finally:
        peer.stop()
    assert ("interrupted: process 0 stopped while waiting for the other processes in the comparison of the recipe "
            "and versions") in rank0.text()


@pytest.mark.parametrize("error,line", [
    ("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 6000ms for recv operation to complete",
     "process 0: no answer from the other processes within 0.1 minutes (runtime.collective_timeout) in the test; "
     "another process stopped or is stuck"),
    ("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:25250. This is typically caused by a "
     "remote worker crashing.", "process 0: another process stopped during the test (see its own error)"),
])
def test_a_failed_collective_is_one_line(monkeypatch, error, line):
    monkeypatch.setattr(distributed._waiting, "timeout_minutes", 0.1)  # as `join` sets it
    with pytest.raises(ProcessGroupError) as caught, distributed._collective("the test"):
        raise RuntimeError(error)
    assert str(caught.value) == line


# -- resume checkpoints under torchrun ------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,named", [
    (["--resume"], "--resume"),
    (["--checkpoint-dir", "CKPT"], "--checkpoint-dir"),
])
def test_checkpoints_are_refused_under_torchrun_before_anything_is_read(monkeypatch, tiny_model_dir, tmp_path,
                                                                         flags, named):
    monkeypatch.setenv("WORLD_SIZE", "2")
    flags = [str(tmp_path / "ckpt") if f == "CKPT" else f for f in flags]
    result = CliRunner().invoke(app, ["quantize", "--model", str(tiny_model_dir), "-o", str(tmp_path / "out"),
                                      *flags])
    assert result.exit_code == 2, result.output
    assert f"error: {named}: resume checkpoints are written by one process, and this run has 2 (torchrun)" \
        in result.output
    assert "give --output" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_run_under_torchrun_does_not_offer_resume(monkeypatch, tiny_model_dir, tmp_path):
    from slimquant import workflow

    def interrupted(job, console):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "run_quantize_job", interrupted)
    args = ["quantize", "--model", str(tiny_model_dir), "-o", str(tmp_path / "out")]
    alone = CliRunner().invoke(app, args)
    assert alone.exit_code == 130 and "--resume" in alone.output  # one process checkpoints beside the output
    monkeypatch.setenv("WORLD_SIZE", "2")
    several = CliRunner().invoke(app, args)
    assert several.exit_code == 130 and "interrupted" in several.output and "--resume" not in several.output
