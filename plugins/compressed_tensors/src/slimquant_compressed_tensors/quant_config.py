"""config.json's `quantization_config`: one config group per distinct scheme, the float Linears ignored."""

from __future__ import annotations

from slimquant_compressed_tensors.schemes import LinearSpec

MIXED = "mixed-precision"


def quantization_config(specs: dict[str, LinearSpec], float_linears: list[str]) -> dict:
    """`specs`: every quantized Linear's scheme; `float_linears`: every nn.Linear left in float (lm_head, ignored
    layers). With one scheme the group targets "Linear" and the float ones are ignored; with several, each group
    names its Linears; the float ones are listed in `ignore` either way."""
    by_scheme: dict[tuple, list[str]] = {}
    for name, spec in specs.items():
        by_scheme.setdefault(spec.key(), []).append(name)
    groups = {}
    for i, names in enumerate(by_scheme.values()):
        spec = specs[names[0]]
        groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(by_scheme) == 1 else names,
            "weights": spec.weights.args(),
            "input_activations": None if spec.act is None else spec.act.args(),
            "output_activations": None,
            "format": spec.format,
        }
    formats = {g["format"] for g in groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else MIXED,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(float_linears),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
