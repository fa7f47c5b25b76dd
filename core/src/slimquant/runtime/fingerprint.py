"""What makes two runs the same run: a checkpoint may only be resumed by a run with the same fingerprint.

Four parts, each a sha256 (versions as a mapping), so that a refusal can name the part that differs:

- model: the config (as JSON, without `_name_or_path`) and every state_dict tensor's name, dtype, shape and bytes,
  hashed before quantization. Hashing the weights costs one read of them (about 1 s per GB here), far less than
  quantizing them, and unlike file sizes and mtimes it also holds for a model built or changed in memory.
- recipe: the recipe as canonical JSON (sorted keys), without the runtime settings that cannot change the result
  (progress, check_finite, the checkpoint settings themselves).
- samples: every calibration sample's dtype, shape and token ids (none on the data-free path).
- versions: slimquant, torch, transformers and the version of each plugin the run uses.
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

RUN_ONLY_SETTINGS = ("progress", "check_finite", "checkpoint_dir", "resume", "keep_checkpoint")


def _update_with_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        data = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
        digest.update(json.dumps(data, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        _update_with_tensor(digest, name, tensor)
    return digest.hexdigest()


def recipe_hash(recipe: Recipe) -> str:
    data = recipe.model_dump(mode="json")
    for key in RUN_ONLY_SETTINGS:
        data["runtime"].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


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
            "versions": versions(algorithms), "precision": _precision_name(pass_dtype)}


def _precision_name(pass_dtype: torch.dtype | None) -> str:
    return "model dtype" if pass_dtype is None else str(pass_dtype).removeprefix("torch.")


def differences(saved: dict, current: dict) -> list[str]:
    """What differs between two fingerprints, in words."""
    found = [f"the {part} differs" for part in ("model", "recipe", "samples") if saved.get(part) != current.get(part)]
    saved_precision = saved.get("precision", _precision_name(None))  # checkpoints from before it was recorded
    if saved_precision != current.get("precision"):
        found.append(f"the calibration passes computed in {saved_precision}, here in {current.get('precision')}")
    old, new = saved.get("versions", {}), current.get("versions", {})
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            found.append(f"{name} version {old.get(name, 'absent')} -> {new.get(name, 'absent')}")
    return found
