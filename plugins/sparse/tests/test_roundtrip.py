"""Save -> load gives identical logits (with and without outliers, 2:4 and unstructured); what the files hold is
the sparsity asked for, read back from disk, in exactly the bytes of the codes, scales, offsets and outliers."""

import json
import struct

import pytest
import torch

import slimquant
from slimquant.export import save_quantized
from slimquant.export.reader import QuantizedFiles
from slimquant.loader import load_quantized
from slimquant.quant.fake_linear import FakeQuantLinear
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


def _safetensors_header_bytes(path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


@pytest.mark.parametrize("pattern,fraction,weights", [
    ("unstructured", 0.02, {"bits": 8, "symmetric": True}),  # W8 per channel, int8 codes, with outliers
    ("2:4", 0.0, {"bits": 4, "symmetric": False, "group_size": 32}),  # W4 g32, packed two codes per byte
    ("unstructured", 0.0, {"bits": 4, "symmetric": False, "group_size": 32}),
])
def test_saved_sparsity_and_bytes_on_disk_are_exact(tmp_path, pattern, fraction, weights):
    """bench_sparse.py's `sparsity` and `disk_mb`, checked: the zero fraction read back from the files is the one the
    model computes with (outliers count as non-zero), and the weight files hold the float tensors, each Linear's
    codes (1 byte per weight at 8 bits, half a byte at 4), float32 scale and offset per group and its outliers
    (index + float16 value), and nothing else but the safetensors header: the mask costs no byte and saves none."""
    model = tiny_model("llama")
    quantized = {"weights": weights, "runtime": {"progress": False},
                 "algorithms": [{"name": "sparse", "sparsity": 0.5, "pattern": pattern, "fraction": fraction}]}
    report = slimquant.quantize(model, quantized, samples=token_samples(4, 32))
    save_quantized(model, tmp_path / "out", save_type=["safe_tensor"], linear_types=report.linear_types())
    fakes = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    found = saved_sparsity(tmp_path / "out")
    assert set(found) == set(fakes) and len(found) == 14

    files = QuantizedFiles(tmp_path / "out")
    total_weights = zero_weights = 0
    for name, s in found.items():
        module = fakes[name]
        with torch.no_grad():
            in_memory = module.weight
        assert s.zero_weights == float((in_memory == 0).float().mean()), name  # what the model computes with
        assert s.zero_weights >= 0.5, (name, s)
        total_weights += s.weights
        zero_weights += s.zero_weights * s.weights
        out_features, in_features = module.out_features, module.in_features
        groups = 1 if weights.get("group_size") is None else -(-in_features // weights["group_size"])
        codes = out_features * (in_features if weights["bits"] == 8 else -(-in_features // 2))
        outliers = 0
        if s.outliers:
            index, values = files.get(f"{name}.weight_outlier_index"), files.get(f"{name}.weight_outlier_value")
            assert index.element_size() in (4, 8) and values.dtype == torch.float16
            outliers = s.outliers * (index.element_size() + values.element_size())
        assert s.stored_bytes == codes + 2 * 4 * out_features * groups + outliers, (name, s)
    assert zero_weights / total_weights >= 0.5
    if fraction:
        assert sum(s.outliers for s in found.values()) > 0
        assert zero_weights / total_weights < sum(s.zero_codes * s.weights for s in found.values()) / total_weights

    float_bytes = sum(t.numel() * t.element_size() for k, t in tiny_model("llama").state_dict().items()
                      if k.rpartition(".")[0] not in fakes)
    weight_files = list((tmp_path / "out").glob("*.safetensors"))
    headers = sum(_safetensors_header_bytes(p) for p in weight_files)
    on_disk = sum(p.stat().st_size for p in weight_files)
    assert on_disk == headers + float_bytes + sum(s.stored_bytes for s in found.values())
    assert bytes_on_disk(tmp_path / "out") > on_disk  # plus the description
