"""write_report: the PNGs in a folder, and report.html showing them (embedded as data URIs) with their numbers."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from slimquant.errors import OutputError
from slimquant.plots.figures import bit_map, linear_errors_by_layer, sensitivity_by_candidate

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em;background:#fff;color:#222}} img{{max-width:100%;display:block}}
table{{border-collapse:collapse;font-size:13px;margin:1em 0}} td,th{{border:1px solid #ccc;padding:2px 8px;
text-align:right}} td:first-child,th:first-child{{text-align:left}} .chosen{{font-weight:bold;background:#eef}}</style>
</head><body><h1>{title}</h1>
{body}
</body></html>
"""


def _image(name: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" data-file="{name}"></figure>'


def _table(header: list[str], rows: list[list[str]], classes: list[list[str]] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for r, row in enumerate(rows):
        cells = []
        for c, cell in enumerate(row):
            cls = f' class="{classes[r][c]}"' if classes and classes[r][c] else ""
            cells.append(f"<td{cls}>{html.escape(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _budget_section(budget) -> tuple[str, bytes]:
    names = [c.name for c in budget.linears]
    png = sensitivity_by_candidate(names, budget.candidates, [c.sensitivity for c in budget.linears],
                                   [c.chosen for c in budget.linears])
    summary = _table(["measure", "value"], [
        ["method", budget.method], ["budget (bits per weight)", f"{budget.budget_avg_bits:.4f}"],
        ["used (bits per weight, scales included)", f"{budget.avg_bits:.4f}"],
        ["budget / used (bytes)", f"{budget.budget_bits // 8} / {budget.used_bits // 8}"],
        ["predicted loss (KL per token, summed)", f"{budget.predicted_loss:.4g}"]])
    rows = [[c.name, *(f"{s:.3g}" for s in c.sensitivity), budget.candidates[c.chosen],
             f"{c.bits / c.weights:.3f}"] for c in budget.linears]
    classes = [["", *("chosen" if j == c.chosen else "" for j in range(len(c.sensitivity))), "", ""]
               for c in budget.linears]
    table = _table(["Linear", *budget.candidates, "chosen", "bits per weight"], rows, classes)
    return summary + table, png


def write_report(directory: str | Path, *, linear_errors: dict[str, float] | None = None,
                 bits: dict[str, float] | None = None, budget=None, title: str = "slimquant report") -> Path:
    """Writes linear_errors.png, sensitivity.png and budget.json (with a budget report) and bit_map.png for what is
    given, and report.html holding them all; returns the page's path."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create plot folder {directory}: {exc.strerror}") from None
    sections = []
    if linear_errors:
        png = linear_errors_by_layer(linear_errors)
        (directory / "linear_errors.png").write_bytes(png)
        worst = sorted(linear_errors.items(), key=lambda kv: kv[1], reverse=True)
        sections.append("<h2>Per-Linear error by layer</h2>" + _image("linear_errors.png", png, "per-Linear error")
                        + _table(["Linear", "||y_q - y||² / ||y||²"], [[n, f"{e:.3e}"] for n, e in worst]))
    if budget is not None:
        body, png = _budget_section(budget)
        (directory / "sensitivity.png").write_bytes(png)
        (directory / "budget.json").write_text(json.dumps(budget.to_dict(), indent=1))
        sections.append("<h2>Sensitivity per candidate</h2>" + _image("sensitivity.png", png, "sensitivity") + body)
    if bits:
        png = bit_map(bits)
        (directory / "bit_map.png").write_bytes(png)
        sections.append("<h2>Bit map</h2>" + _image("bit_map.png", png, "weight bits per Linear")
                        + _table(["Linear", "bits"], [[n, f"{b:g}"] for n, b in bits.items()]))
    if not sections:
        sections.append("<p>nothing to plot: no per-Linear errors, bits or budget were measured</p>")
    page = directory / "report.html"
    page.write_text(PAGE.format(title=html.escape(title), body="\n".join(sections)), encoding="utf-8")
    return page
