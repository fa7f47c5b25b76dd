"""SmoothQuant for slimquant: the `smoothquant` smoothing plugin."""

from slimquant_smoothquant.plugin import SmoothQuantConfig, SmoothQuantPlugin

__all__ = ["SmoothQuantConfig", "SmoothQuantPlugin"]
