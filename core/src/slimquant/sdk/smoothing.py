"""The equivalent rewrites smoothers share (``from slimquant.sdk import smoothing``).

A smoother reads ``units(ctx)`` (the layer's subgraphs, resolved to modules), accumulates input ranges with
``record_range`` during its observation pass, chooses per-channel scales (``absmax``, ``migration_scales``) and
rewrites with ``scale_unit`` / ``shift_unit`` inside ``Guard.apply``, which undoes, with a warning naming the
subgraph, any rewrite that changed the layer's output. ``norm_flavor`` tells a norm that scales by its weight
(``"scale"``) from one that scales by one plus it (``"offset"``, Gemma's), for rewrites that fold a norm's weight.
"""

from slimquant.smoothing import (
    Guard,
    Unit,
    absmax,
    migration_scales,
    norm_flavor,
    record_range,
    scale_unit,
    shift_unit,
    units,
)

__all__ = ["Guard", "Unit", "absmax", "migration_scales", "norm_flavor", "record_range", "scale_unit", "shift_unit",
           "units"]
