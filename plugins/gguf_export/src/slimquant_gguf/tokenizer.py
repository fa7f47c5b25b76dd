"""Tokenizer metadata: copied from the GGUF the model was loaded from, or llama.cpp's "no vocabulary" marker.

transformers does not record which GGUF a model came from; its config's `_name_or_path` is the folder (or file)
given to from_pretrained. A source is used when that names one .gguf file (or a folder holding exactly one) whose
token list has the model's vocab_size entries; converting a Hugging Face tokenizer into GGUF's is not done here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gguf

log = logging.getLogger(__name__)

NO_VOCAB = "none"  # llama.cpp: LLAMA_VOCAB_TYPE_NONE, a model that runs on token ids only


def source_gguf(config) -> Path | None:
    source = Path(str(getattr(config, "_name_or_path", "") or ""))
    if not str(source) or not source.exists():
        return None
    candidates = [source] if source.is_file() else sorted(source.glob("*.gguf"))
    if len(candidates) != 1 or candidates[0].suffix != ".gguf":
        return None
    return candidates[0]


def _value(field):
    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        return field.contents(), kind, field.types[-1]
    return field.contents(), kind, None


def copy_tokenizer(writer: gguf.GGUFWriter, config) -> Path | None:
    """Write the tokenizer.* keys of the source GGUF; return it, or None after writing the no-vocab marker."""
    path = source_gguf(config)
    if path is not None:
        fields = gguf.GGUFReader(path).fields
        tokens = fields.get("tokenizer.ggml.tokens")
        if tokens is not None and len(tokens.data) == config.vocab_size:
            for key, field in fields.items():
                if key.startswith("tokenizer."):
                    value, kind, sub = _value(field)
                    writer.add_key_value(key, value, kind, sub_type=sub)
            return path
    log.warning("gguf: no source GGUF with the model's %d tokens; the file gets no vocabulary (llama.cpp runs it "
                "on token ids only)", config.vocab_size)
    writer.add_tokenizer_model(NO_VOCAB)
    return None
