"""GPTQ's sums round differently with another number of CPU threads, so a checkpoint records the count and a resume
with another count is refused, naming both (the README promises byte-identical output after a resume)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, token_samples

import slimquant
from slimquant.errors import CheckpointError
from slimquant.runtime.fingerprint import differences

GPTQ = {"scheme": "W4A16", "weights": {"bits": 4, "group_size": 16}, "algorithms": ["gptq"]}


@pytest.fixture
def threads():
    """Set torch's thread count for the test, and put the original back."""
    original = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(original)


def quantize(checkpoint_dir, resume: bool):
    runtime = {"progress": False, "checkpoint_dir": str(checkpoint_dir), "resume": resume, "keep_checkpoint": True}
    return slimquant.quantize(tiny_model("llama"), {**GPTQ, "runtime": runtime}, samples=token_samples(4, 16))


def test_a_resume_with_another_thread_count_is_refused_naming_both(tmp_path, threads):
    threads(1)
    quantize(tmp_path / "ckpt", resume=False)
    threads(2)
    with pytest.raises(CheckpointError, match=r"this run uses 2 CPU threads, the checkpoint's used 1 \(set "
                                              r"OMP_NUM_THREADS to match\)"):
        quantize(tmp_path / "ckpt", resume=True)
    threads(1)
    assert quantize(tmp_path / "ckpt", resume=True).resumed_layers == 2


def test_a_checkpoint_from_before_threads_were_recorded_is_not_refused_for_them():
    fingerprint = {"model": "m", "recipe": "r", "samples": "s", "versions": {}, "precision": "model dtype"}
    assert differences(fingerprint, {**fingerprint, "threads": 4}) == []
    assert differences({**fingerprint, "threads": 1}, {**fingerprint, "threads": 4}) == [
        "this run uses 4 CPU threads, the checkpoint's used 1 (set OMP_NUM_THREADS to match)"]
