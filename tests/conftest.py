"""Shared fixtures: a tiny Llama saved to disk with a word-level tokenizer, so the CLI runs without downloads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_tokenizer import WORDS, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny_models import tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def calib_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(WORDS * 8) + "\n")
    return path
