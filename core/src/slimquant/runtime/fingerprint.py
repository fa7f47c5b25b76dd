"""What makes two runs the same run: a checkpoint may only be resumed by a run with the same fingerprint.

Four parts, each a sha256 (versions as a mapping), so that a refusal can name the part that differs:

- model: the config (as JSON, without `_name_or_path`) and every state_dict tensor's name, dtype, shape and bytes,
  hashed before quantization. Hashing the weights costs one read of them (about 1 s per GB here), far less than
  quantizing them, and unlike file sizes and mtimes it also holds for a model built or changed in memory.
- recipe: the recipe as canonical JSON (sorted keys), without the runtime settings that cannot change the result
  (progress, check_finite, the checkpoint settings themselves).
- samples: every calibration sample's dtype, shape and token ids (none on the data-free path).
- versions: slimquant, torch, transformers and the version of each plugin the run uses.

And the number of CPU threads (torch.get_num_threads()): GPTQ's sums round differently with another count, so a run
resumed with another count would match neither uninterrupted run.

Several processes compare most of the same before any work (`job_parts`, `model_parts`, `samples_parts`, sent by
`slimquant.runtime.distributed.agree`), as JSON values rather than hashes where a difference can be named.
"""

from __future__ import annotations

import hashlib
import json

import torch
import transformers
from torch import nn

import slimquant
from slimquant.config.recipe import Recipe
from slimquant.plugins import ALGORITHMS, AlgorithmPlan, installed

RUN_ONLY_SETTINGS = ("progress", "check_finite", "checkpoint_dir", "resume", "keep_checkpoint", "collective_timeout")
# where each process finds its inputs: processes may find the same model and data in other places (the model and the
# samples are compared by their contents)
MACHINE_SETTINGS = {"model": ("path", "gguf_file", "device"), "calibration": ("path",)}


def _update_with_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def _config_json(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    data = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
    return json.dumps(data, sort_keys=True, default=str)


def _update_with_weights(digest, model: nn.Module) -> None:
    for name, tensor in model.state_dict().items():
        _update_with_tensor(digest, name, tensor)


def model_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    config = _config_json(model)
    if config is not None:
        digest.update(config.encode())
    _update_with_weights(digest, model)
    return digest.hexdigest()


def recipe_fields(recipe: Recipe) -> dict:
    """The recipe as JSON, without the runtime settings that cannot change the result."""
    data = recipe.model_dump(mode="json")
    for key in RUN_ONLY_SETTINGS:
        data["runtime"].pop(key, None)
    return data


def recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(recipe_fields(recipe), sort_keys=True).encode()).hexdigest()


def samples_hash(samples: list[torch.Tensor] | None) -> str:
    digest = hashlib.sha256()
    for i, ids in enumerate(samples or []):
        _update_with_tensor(digest, str(i), ids)
    return digest.hexdigest()


def versions(algorithms: AlgorithmPlan) -> dict[str, str]:
    found = installed(ALGORITHMS)
    used = {name: found[name].version if name in found else "?" for name in sorted(algorithms.plugins.plugins)}
    return {"slimquant": slimquant.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, **{f"plugin {n}": v for n, v in used.items()}}


def run_fingerprint(model: nn.Module, recipe: Recipe, samples: list[torch.Tensor] | None,
                    algorithms: AlgorithmPlan, pass_dtype: torch.dtype | None = None,
                    model_digest: str | None = None) -> dict:
    """`pass_dtype`: what calibration_dtype resolved to on this machine (`auto` may differ between machines).
    `model_digest` stands for `model_hash(model)` when the weights are not in memory (lazy loading hashes the
    checkpoint's files instead)."""
    return {"model": model_digest or model_hash(model), "recipe": recipe_hash(recipe), "samples": samples_hash(samples),
            "versions": versions(algorithms), "precision": _precision_name(pass_dtype),
            "threads": torch.get_num_threads()}


def _precision_name(pass_dtype: torch.dtype | None) -> str:
    return "model dtype" if pass_dtype is None else str(pass_dtype).removeprefix("torch.")


def differences(saved: dict, current: dict) -> list[str]:
    """What differs between two fingerprints, in words."""
    found = [f"the {part} differs" for part in ("model", "recipe", "samples") if saved.get(part) != current.get(part)]
    saved_precision = saved.get("precision", _precision_name(None))  # checkpoints from before it was recorded
    if saved_precision != current.get("precision"):
        found.append(f"the calibration passes computed in {saved_precision}, here in {current.get('precision')}")
    if saved.get("threads", current.get("threads")) != current.get("threads"):  # recorded since threads mattered
        found.append(f"this run uses {current.get('threads')} CPU threads, the checkpoint's used {saved['threads']} "
                     "(set OMP_NUM_THREADS to match)")
    old, new = saved.get("versions", {}), current.get("versions", {})
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            found.append(f"{name} version {old.get(name, 'absent')} -> {new.get(name, 'absent')}")
    return found


def job_parts(recipe: Recipe, algorithms: AlgorithmPlan, formats: list[str] | None = None) -> dict:
    """What several processes must share before they load anything: the recipe (without where each finds its
    files), the output formats and the versions."""
    fields = recipe_fields(recipe)
    for section, keys in MACHINE_SETTINGS.items():
        for key in keys:
            fields[section].pop(key, None)
    parts = {"recipe": fields, "versions": versions(algorithms)}
    if formats is not None:
        parts["formats"] = list(formats)
    return parts


def model_parts(model: nn.Module) -> dict:
    """The model's config (compared field by field) and a sha256 of its weights."""
    config = _config_json(model)
    digest = hashlib.sha256()
    _update_with_weights(digest, model)
    return {"model config": None if config is None else json.loads(config), "model weights": digest.hexdigest()}


def samples_parts(samples: list[torch.Tensor] | None, pass_dtype: torch.dtype | None) -> dict:
    """The calibration samples (how many, and a sha256 of their token ids) and what the passes compute in."""
    tensors = all(torch.is_tensor(s) for s in samples or [])
    token_ids = samples_hash(samples) if tensors else "not token tensors"
    return {"calibration samples": {"count": len(samples or []), "token ids": token_ids},
            "calibration dtype": _precision_name(pass_dtype)}
