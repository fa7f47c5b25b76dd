"""What a run of the layer-by-layer runtime reports: per decoder layer, and for the whole model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from slimquant.runtime.plan import LinearPlan

if TYPE_CHECKING:
    from slimquant.budget import BudgetReport


@dataclass
class LayerReport:
    index: int
    seconds: float
    output_rel_error: float  # ||quantized - float||^2 / ||float||^2 of the layer output (0 when data-free)
    quantized: int
    kept_float: int


@dataclass
class QuantizationReport:
    layers: list[LayerReport] = field(default_factory=list)
    plans: dict[str, LinearPlan | None] = field(default_factory=dict)
    linear_errors: dict[str, float] = field(default_factory=dict)  # relative output error per Linear
    seconds: float = 0.0
    data_free: bool = False
    budget: BudgetReport | None = None  # what budget mode measured and chose, when the recipe had a budget
    checkpoint: Path | None = None  # the resume checkpoint to delete once the output is saved (remove_checkpoint)
    resumed_layers: int = 0  # decoder layers restored from a checkpoint instead of quantized by this run
    calibration_dtype: str = "model dtype"  # what the calibration passes computed in (runtime.calibration_dtype)
    transforms: list[str] = field(default_factory=list)  # what the model transforms did (ModelContext.note)

    def linear_types(self) -> dict[str, str]:
        return {n: ("FLOAT" if p is None else p.scheme.type_name) for n, p in self.plans.items()}
