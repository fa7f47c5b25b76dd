"""A word-level tokenizer over a small English vocabulary, so tokenizer-dependent tests need no download
(imported by name: a module called `conftest` would be shadowed by the plugins' own conftest files)."""

from __future__ import annotations

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
