"""`slimquant inspect`: what a saved output holds — scheme, Linears per type, bits, group sizes, files, sizes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Column, Table

from slimquant.export.reader import QuantizedFiles


def describe(output: Path, console: Console, list_layers: bool = False) -> dict:
    files = QuantizedFiles(output, verify=True)  # checks every file against its recorded sha256
    linears = files.meta["linears"]
    types = Counter(files.types.values())
    console.print(f"[bold]{output}[/]: model_quant_type [bold]{files.quant_type}[/], "
                  f"{len(linears)} quantized Linears, {types.get('FLOAT', 0)} float tensors")

    schemes = Counter((m["type"], m["bits"], m["group_size"] or "channel", "sym" if m["symmetric"] else "asym",
                       m.get("pack") or "-") for m in linears.values())
    table = Table("type", "bits", "group", "weights", "packing", "Linears", title="schemes")
    for (kind, bits, group, sym, pack), count in sorted(schemes.items(), key=str):
        table.add_row(kind, str(bits), str(group), sym, pack, str(count))
    console.print(table)

    sizes = Table("file", "MB", title="files")
    total = 0
    for path in sorted(output.iterdir()):
        if path.is_file():
            size = path.stat().st_size
            total += size
            sizes.add_row(path.name, f"{size / 2**20:.2f}")
    sizes.add_row("[bold]total[/]", f"{total / 2**20:.2f}")
    console.print(sizes)
    if files.meta.get("tied"):
        console.print("tied tensors: " + ", ".join(f"{k} -> {v}" for k, v in files.meta["tied"].items()))

    if list_layers:
        detail = Table(Column("Linear", overflow="fold"), "type", "bits", "group", "in", "out", "activations",
                       title="Linears")
        for name, m in linears.items():
            act = m.get("act") or {}
            act_text = "-" if not act else ("dynamic" if act.get("dynamic") else "static") + f" {act.get('bits')}b"
            detail.add_row(name, m["type"], str(m["bits"]), str(m["group_size"] or "channel"),
                           str(m["in_features"]), str(m["out_features"]), act_text)
        console.print(detail)
    return {"model_quant_type": files.quant_type, "linears": len(linears), "bytes": total}
