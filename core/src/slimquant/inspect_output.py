"""`slimquant inspect`: what a saved output holds — scheme, Linears per type, bits, group sizes, files, sizes.

It checks the output as the loader does, short of a model: every weight file against its sha256, the
description against its schema, and each quantized Linear's tensors against its description.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Column, Table

from slimquant.export.reader import QuantizedFiles
from slimquant.loader import read_linear


def describe(output: Path, console: Console, list_layers: bool = False, verify: bool = True) -> dict:
    """verify: require and check the sha256 of every weight file (as load_quantized does)."""
    files = QuantizedFiles(output, verify=verify)
    linears = files.meta.linears
    for name, meta in linears.items():
        read_linear(files, name, meta)
    types = Counter(files.types.values())
    source = f"a {files.meta.model_type} model" if files.meta.model_type else "a model without a config"
    console.print(f"[bold]{output}[/]: model_quant_type [bold]{files.quant_type}[/], saved from {source}, "
                  f"{len(linears)} quantized Linears, {types.get('FLOAT', 0)} float tensors")

    schemes = Counter((m.type, m.bits, m.group_size or "channel", "sym" if m.symmetric else "asym",
                       m.pack or "-") for m in linears.values())
    table = Table("type", "bits", "group", "weights", "packing", "Linears", title="schemes")
    for (kind, bits, group, sym, pack), count in sorted(schemes.items(), key=str):
        table.add_row(kind, str(bits), str(group), sym, pack, str(count))
    console.print(table)

    sizes = Table("file", "MB", title="files")
    total = 0
    for path in sorted(output.iterdir()):
        if path.is_file() and not path.name.startswith("."):  # .slimquant-output is a marker, not part of the model
            size = path.stat().st_size
            total += size
            sizes.add_row(path.name, f"{size / 2**20:.2f}")
    sizes.add_row("[bold]total[/]", f"{total / 2**20:.2f}")
    console.print(sizes)
    if files.meta.tied:
        console.print("tied tensors: " + ", ".join(f"{k} -> {v}" for k, v in files.meta.tied.items()))

    if list_layers:
        detail = Table(Column("Linear", overflow="fold"), "type", "bits", "group", "in", "out", "activations",
                       title="Linears")
        for name, m in linears.items():
            act_text = "-" if m.act is None else ("dynamic" if m.act.dynamic else "static") + f" {m.act.bits}b"
            detail.add_row(name, m.type, str(m.bits), str(m.group_size or "channel"),
                           str(m.in_features), str(m.out_features), act_text)
        console.print(detail)
    return {"model_quant_type": files.quant_type, "model_type": files.meta.model_type, "linears": len(linears),
            "bytes": total}
