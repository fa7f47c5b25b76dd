"""The equivalent rewrites smoothers share (``from slimquant.sdk import smoothing``).

A smoother reads ``units(ctx)`` (the layer's subgraphs, resolved to modules), accumulates input ranges with
``record_range`` during its observation pass, chooses per-channel scales (``absmax``, ``smooth_scales``) and
rewrites with ``scale_unit`` / ``shift_unit`` inside ``Guard.apply``, which undoes, with a warning naming the
subgraph, any rewrite that changed the layer's output.
"""

from slimquant.smoothing import Guard, Unit, absmax, record_range, scale_unit, shift_unit, smooth_scales, units

__all__ = ["Guard", "Unit", "absmax", "record_range", "scale_unit", "shift_unit", "smooth_scales", "units"]
