"""Outlier Suppression+ for slimquant: the `shift` smoothing plugin."""

from slimquant_shift.plugin import ShiftConfig, ShiftPlugin

__all__ = ["ShiftConfig", "ShiftPlugin"]
