"""LayerWiseQuantError: for each quantized Linear, its output error against the float Linear on the same input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from rich.table import Table

from slimquant.errors import OutputError
from slimquant.quant.fake_linear import FakeQuantLinear
from slimquant.runtime.linear_error import measure_linear_errors


@torch.no_grad()
def linear_errors(float_model, quantized_model, samples: list[torch.Tensor]) -> dict[str, float]:
    """Run `samples` through the quantized model; every FakeQuantLinear's input also goes through its float
    twin in `float_model`. Returns name -> ||y_q - y||^2 / ||y||^2, worst first."""
    fakes = {n: m for n, m in quantized_model.named_modules() if isinstance(m, FakeQuantLinear)}
    floats = dict(float_model.named_modules())
    twins = {n: floats[n] for n in fakes}
    errors: dict[str, float] = {}
    device = next(quantized_model.parameters()).device
    with measure_linear_errors(fakes, twins, into=errors):
        for ids in samples:
            quantized_model(input_ids=ids.to(device), use_cache=False)
    return dict(sorted(errors.items(), key=lambda kv: kv[1], reverse=True))


def errors_table(errors: dict[str, float], limit: int = 20) -> Table:
    table = Table("rank", "Linear", "relative output error", title=f"largest per-Linear errors (of {len(errors)})")
    worst_first = sorted(errors.items(), key=lambda kv: kv[1], reverse=True)
    for rank, (name, err) in enumerate(worst_first[:limit], start=1):
        table.add_row(str(rank), name, f"{err:.3e}")
    return table


def save_errors(errors: dict[str, float], path: Path) -> None:
    """Write the errors as JSON, whole or not at all (a full disk leaves no empty or partial file)."""
    ordered = dict(sorted(errors.items(), key=lambda kv: kv[1], reverse=True))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"metric": "||y_q - y||^2 / ||y||^2", "errors": ordered}, indent=1))
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
