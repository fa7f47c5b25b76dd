"""Save -> load gives identical logits (with and without outliers, 2:4 and unstructured); what the files hold is
the sparsity asked for, read back from disk."""

import json

import pytest
import torch

import slimquant
from slimquant.export import save_quantized
from slimquant.loader import load_quantized
from slimquant.testing import tiny_model, token_samples
from slimquant_sparse import bytes_on_disk, saved_sparsity

SCHEMES = {"W8A8": {"scheme": "W8A8"}, "W4A16": {"weights": {"bits": 4, "symmetric": False, "group_size": 32}}}


@pytest.mark.parametrize("pattern,fraction,scheme", [("unstructured", 0.0, "W8A8"), ("2:4", 0.0, "W8A8"),
                                                     ("unstructured", 0.02, "W4A16"), ("2:4", 0.02, "W8A8")])
def test_round_trip_and_sparsity_on_disk(tmp_path, pattern, fraction, scheme):
    model = tiny_model("llama")
    recipe = {**SCHEMES[scheme], "runtime": {"progress": False},
              "algorithms": [{"name": "sparse", "sparsity": 0.5, "pattern": pattern, "fraction": fraction}]}
    report = slimquant.quantize(model, recipe, samples=token_samples(4, 32))
    ids = token_samples(1, 16, seed=7)[0]
    with torch.no_grad():
        logits = model(ids).logits
    save_quantized(model, tmp_path / "out", save_type=["safe_tensor"], linear_types=report.linear_types())
    with torch.no_grad():
        reloaded = load_quantized(tiny_model("llama"), tmp_path / "out")(ids).logits
    assert torch.equal(reloaded, logits)

    description = json.loads(next((tmp_path / "out").glob("quant_model_description*.json")).read_text())
    assert description["model_quant_type"] == f"{scheme}S"
    found = saved_sparsity(tmp_path / "out")
    assert found and all(s.pattern == pattern for s in found.values())
    rounded_to_zero = 0.01 if scheme == "W8A8" else 0.05  # survivors that round to 0 at these bits
    for name, s in found.items():
        assert 0.5 <= s.zero_weights <= s.zero_codes <= 0.5 + fraction + rounded_to_zero, (name, s)
        assert s.outliers <= int(fraction * s.weights), (name, s)
    if fraction:
        assert sum(s.outliers for s in found.values()) > 0
    assert bytes_on_disk(tmp_path / "out") > sum(s.stored_bytes for s in found.values())
    print(f"{pattern} fraction={fraction} {scheme}: {bytes_on_disk(tmp_path / 'out')} bytes on disk")


def test_a_broken_n_m_pattern_on_disk_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from slimquant.errors import OutputError

    model = tiny_model("llama")
    recipe = {"scheme": "W8A16", "runtime": {"progress": False},
              "algorithms": [{"name": "sparse", "pattern": "2:4", "method": "magnitude"}]}
    report = slimquant.quantize(model, recipe)
    save_quantized(model, tmp_path / "out", save_type=["safe_tensor"], linear_types=report.linear_types())
    path = next((tmp_path / "out").glob("*.safetensors"))
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[key][0, :4] = 1
    save_file(tensors, path)
    with pytest.raises(OutputError, match="2:4"):
        load_quantized(tiny_model("llama"), tmp_path / "out", verify=False)
