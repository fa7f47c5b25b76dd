"""Calibration samples as token tensors, from texts, files, `datasets`, or text the model writes itself."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from slimquant.config.recipe import CalibrationSpec
from slimquant.errors import CalibrationError

log = logging.getLogger(__name__)

Sample = torch.Tensor  # LongTensor [1, seq]


def build_samples(spec: CalibrationSpec, tokenizer, model=None) -> list[Sample]:
    if spec.source == "generate":
        if model is None:
            raise CalibrationError("calibration source 'generate' needs the model")
        return generate_samples(model, tokenizer, spec.num_samples, spec.seqlen, spec.seed, spec.prompt)
    if spec.source == "texts":
        return from_texts(spec.texts, tokenizer, spec.seqlen, spec.num_samples)
    if spec.source == "text_file":
        return random_windows(read_text(spec.path), tokenizer, spec.num_samples, spec.seqlen, spec.seed,
                              where=spec.path)
    if spec.source == "jsonl":
        return from_texts(read_jsonl(spec.path, spec.jsonl_field), tokenizer, spec.seqlen, spec.num_samples)
    return random_windows(load_dataset_text(spec), tokenizer, spec.num_samples, spec.seqlen, spec.seed,
                          where=f"dataset {spec.dataset}")


def from_user_data(data, tokenizer, seqlen: int | None = None) -> list[Sample]:
    """Python-API calibration data: strings, token tensors, or msModelSlim's [[input_ids, attention_mask], ...]."""
    if data is None or (isinstance(data, Sequence) and len(data) == 0):
        raise CalibrationError("calibration data is empty: give samples, or use the 'generate' source")
    samples: list[Sample] = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            samples.extend(from_texts([item], tokenizer, seqlen, None))
            continue
        if isinstance(item, (list, tuple)) and item and torch.is_tensor(item[0]):
            item = item[0]  # msModelSlim passes [input_ids, attention_mask]
        if isinstance(item, dict) and "input_ids" in item:
            item = item["input_ids"]
        if not torch.is_tensor(item) or item.dtype not in (torch.int64, torch.int32):
            raise CalibrationError(f"calibration sample {i}: expected text or a tensor of token ids, "
                                   f"got {type(item).__name__}")
        if item.numel() == 0:
            raise CalibrationError(f"calibration sample {i} has no tokens")
        item = item.long().reshape(-1, item.shape[-1])
        samples.extend(row[None, :seqlen] for row in item)
    if not samples:
        raise CalibrationError("calibration data holds no tokens")
    return samples


def from_texts(texts, tokenizer, seqlen: int | None, limit: int | None) -> list[Sample]:
    samples = []
    for text in texts:
        if not text or not text.strip():
            continue
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"]
        samples.append(ids[:, :seqlen] if seqlen else ids)
        if limit and len(samples) >= limit:
            break
    if not samples:
        raise CalibrationError("calibration texts are all empty")
    return samples


def read_text(path: str, what: str = "calibration file") -> str:
    try:
        text = Path(path).read_text(encoding="utf-8").replace("\r\n", "\n")
    except OSError as exc:
        raise CalibrationError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{what} {path} is not UTF-8 text: {exc}") from exc
    if not text.strip():
        raise CalibrationError(f"{what} {path} is empty")
    return text


def read_jsonl(path: str, field: str) -> list[str]:
    texts = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise CalibrationError(f"{path}:{n}: no text field {field!r}")
        texts.append(record[field])
    return texts


def load_dataset_text(spec: CalibrationSpec) -> str:
    try:
        import datasets
    except ImportError:
        raise CalibrationError("calibration source 'dataset' needs the `datasets` package") from None
    try:
        ds = datasets.load_dataset(spec.dataset, spec.dataset_config, split=spec.split)
    except Exception as exc:
        raise CalibrationError(f"cannot load dataset {spec.dataset!r}: {exc}") from exc
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(t for t in ds[column] if isinstance(t, str))


def random_windows(text: str, tokenizer, count: int, seqlen: int, seed: int, where: str) -> list[Sample]:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    total = ids.shape[1]
    if total == 0:
        raise CalibrationError(f"{where}: no tokens")
    if total <= seqlen:
        log.warning("%s holds %d tokens, fewer than seqlen=%d: using one shorter sample", where, total, seqlen)
        return [ids]
    if count > total - seqlen:
        raise CalibrationError(f"{where}: num_samples={count} asks for more windows of seqlen={seqlen} tokens than its "
                               f"{total} tokens hold ({total - seqlen} distinct ones); use fewer samples or more text")
    rng = random.Random(seed)
    starts = [rng.randrange(0, total - seqlen) for _ in range(count)]
    return [ids[:, s:s + seqlen] for s in starts]


@torch.no_grad()
def generate_samples(model, tokenizer, count: int, seqlen: int, seed: int, prompt: str = "",
                     batch_size: int = 16) -> list[Sample]:
    """Text the model writes itself (sampled, temperature 1), so calibration needs no data at all."""
    device = next(model.parameters()).device
    start = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"] if prompt else None
    if start is None or start.numel() == 0:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise CalibrationError("cannot generate calibration text: the tokenizer has no BOS/EOS token")
        start = torch.tensor([[bos]])
    samples: list[Sample] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while len(samples) < count:
            n = min(batch_size, count - len(samples))
            out = model.generate(
                start.expand(n, -1).to(device), attention_mask=torch.ones(n, start.shape[1], dtype=torch.long,
                                                                          device=device),
                do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_length=seqlen, min_length=seqlen,
                pad_token_id=tokenizer.eos_token_id, eos_token_id=None,
            )
            samples.extend(row[None].cpu() for row in out)
    return samples
