"""PNG figures and one self-contained HTML page of where a quantized model's accuracy goes (needs slimquant[plots])."""

from slimquant.plots.page import write_report

__all__ = ["write_report"]
