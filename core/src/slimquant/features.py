"""The features of a quantized output (contract v3): what a plan will produce beyond plain uniform codes and scales,
and what an exporter or a grid can hold.

A weight algorithm, a grid provider and a model transform each declare, per ``LinearPlan``, the features their
output has (``output_features(plan)``: each feature to the setting that causes it, e.g. ``{Feature.PERMUTED_GROUPS:
"act_order: true"}``); the scheme adds its own (``weights.channel_bits``: two-level scales) and a ``kv_cache``
section adds ``KV_CACHE``. Each exporter and each grid declares ``holds``, the features it can take. The core
refuses every feature a plan produces and a format or grid does not hold, at plan time, before any model is
loaded, naming the plugin, the feature and the setting. At export the same check runs on what each quantized
Linear actually holds (``features_of``), so that a saved output converted later is refused the same way.
"""

from __future__ import annotations

from enum import StrEnum

import torch


class Feature(StrEnum):
    """One thing a quantized output may hold beyond plain uniform codes and scales; ``meaning`` says it in words."""

    PERMUTED_GROUPS = "permuted_groups"
    SWEEP_GROUPS = "sweep_groups"
    FRACTIONAL_ZEROS = "fractional_zeros"
    CODEBOOK = "codebook"
    QUANTIZED_SCALES = "quantized_scales"
    TWO_LEVEL_SCALES = "two_level_scales"
    SPARSITY = "sparsity"
    OUTLIERS = "outliers"
    KV_CACHE = "kv_cache"
    ONLINE_TRANSFORM = "online_transform"

    @property
    def meaning(self) -> str:
        return MEANINGS[self]


MEANINGS = {
    Feature.PERMUTED_GROUPS: "groups permuted over the input channels (g_idx)",
    Feature.SWEEP_GROUPS: "group scales chosen part way through a sweep, from each group's own columns",
    Feature.FRACTIONAL_ZEROS: "fractional zero points",
    Feature.CODEBOOK: "codes standing for a codebook's values (a non-uniform grid)",
    Feature.QUANTIZED_SCALES: "scales stored quantized (integer codes under block scales)",
    Feature.TWO_LEVEL_SCALES: "two-level scales (a per-channel scale times a per-group one)",
    Feature.SPARSITY: "pruned weights",
    Feature.OUTLIERS: "16-bit outlier weights beside the codes",
    Feature.KV_CACHE: "a quantized attention cache",
    Feature.ONLINE_TRANSFORM: "a transform applied to activations at inference (an online rotation)",
}

# Features a plan has that its output does not show: checked against the grid, never against an exporter.
PLAN_ONLY = frozenset({Feature.SWEEP_GROUPS})
# What a weight algorithm's codes can carry onto a grid: every grid holds these unless it declares otherwise.
GRID_DEFAULT = frozenset({Feature.PERMUTED_GROUPS, Feature.SWEEP_GROUPS})


def check_features(declared, where: str) -> dict[Feature, str]:
    """A plugin's `output_features(plan)` result as {Feature: setting}; raises TypeError naming `where`."""
    if declared is None:
        return {}
    if not isinstance(declared, dict) or not all(isinstance(k, Feature) and isinstance(v, str)
                                                 for k, v in declared.items()):
        raise TypeError(f"{where}: output_features must return a dict of slimquant.sdk.Feature to the setting that "
                        f"causes it (a string), got {declared!r}")
    return dict(declared)


def refusals(features: dict[Feature, tuple[str, str]], holds: frozenset, holder: str) -> list[str]:
    """One problem per feature (`{feature: (plugin, setting)}`) that `holder` does not hold."""
    return [f"{holder}cannot hold {feature.meaning} ({feature.value}), which {plugin} produces"
            + (f" ({setting})" if setting else "")
            for feature, (plugin, setting) in features.items() if feature not in holds]


def features_of(qweight) -> set[Feature]:
    """The features one quantized weight has, read from its fields."""
    found = set()
    if qweight.permuted_groups:
        found.add(Feature.PERMUTED_GROUPS)
    if qweight.zero is not None and not torch.equal(qweight.zero, torch.round(qweight.zero)):
        found.add(Feature.FRACTIONAL_ZEROS)
    for feature, present in ((Feature.CODEBOOK, qweight.codebook), (Feature.QUANTIZED_SCALES, qweight.scale_quant),
                             (Feature.TWO_LEVEL_SCALES, qweight.two_level), (Feature.SPARSITY, qweight.sparsity),
                             (Feature.OUTLIERS, qweight.outliers)):
        if present is not None:
            found.add(feature)
    return found
