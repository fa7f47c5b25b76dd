"""Shared fixtures: a tiny Llama saved to disk with a word-level tokenizer, so the CLI runs without downloads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

WORDS = ("the a of and to in is was for on that with as by at from it an be this are which or his her "
         "they one all were we when there been has more some would their time what out if up about into "
         "only other new than first any these two may then do after most also made over such very where "
         "through back years much before must good well way down should because each just those people "
         "how too little state world life still own see men work long get here between both under never "
         "day same another know while last might us great old year off come since against go came right "
         "used take three").split()


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


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
