"""Statistics that plugins accumulate over calibration batches, with how each combines across processes declared.

A plugin keeps its statistics in ``ctx.state(self.name)`` as ``Statistic`` objects. Each class declares, per
attribute, how copies gathered on several processes (each having seen its share of the calibration samples)
combine into the statistic of all samples, so that a distributed runtime can reduce them without knowing the
algorithm:

    class HessianSum(Statistic):
        reductions = {"sum": Reduce.SUM, "tokens": Reduce.SUM}

``SUM`` adds (Hessians, counts), ``MIN`` / ``MAX`` take the elementwise extreme (ranges), ``CONCAT`` concatenates
along the first dimension (token samples), and ``MERGE`` means the class's own ``merge`` must see every copy
(a histogram re-binned over the widest range). ``merge(other)`` combines one other copy into this one; the default
implementation follows ``reductions``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

import torch


class Reduce(StrEnum):
    """How one attribute of a Statistic combines across processes (see the module docstring)."""

    SUM = "sum"
    MIN = "min"
    MAX = "max"
    CONCAT = "concat"
    MERGE = "merge"


def _combine(op: Reduce, a, b):
    if a is None:
        return b
    if b is None:
        return a
    if op == Reduce.SUM:
        return a + b
    if op == Reduce.MIN:
        return torch.minimum(a, b) if torch.is_tensor(a) else min(a, b)
    if op == Reduce.MAX:
        return torch.maximum(a, b) if torch.is_tensor(a) else max(a, b)
    if op == Reduce.CONCAT:
        return torch.cat([a, b])
    raise ValueError(f"{op} has no elementwise combination; the class must implement merge()")


class Statistic:
    """Base class of what a plugin accumulates in ``ctx.state``: declare ``reductions``; override ``merge`` only for
    ``Reduce.MERGE`` attributes.

    The base class has no constructor: a subclass writes its own ``__init__`` (the runtime never constructs one)
    and sets there every attribute that ``reductions`` names, typically to None or 0 until the first batch:

        class MeanAbs(Statistic):
            reductions = {"total": Reduce.SUM, "tokens": Reduce.SUM}

            def __init__(self):
                self.total: torch.Tensor | None = None  # per input channel sum of |x|
                self.tokens = 0

    - ``reductions``: class attribute, attribute name -> ``Reduce``; each named attribute holds a tensor or a
      Python number. Attributes it does not name are left as each process has them.
    - ``merge(other)``: combine another copy of the same class into this one (a ``TypeError`` for another class);
      by default each attribute of ``reductions`` as its ``Reduce`` says, None counting as empty.

    On several processes the runtime combines each Statistic in a layer's state after every observation pass, in
    place with collective operations: only ``SUM``, ``MIN`` and ``MAX`` are supported there yet (``CONCAT`` and
    ``MERGE`` are refused with a ``RecipeError``), and an attribute still None on a process is refused. A tensor in a
    distributed plugin's state outside a Statistic is refused too (``PluginError`` naming the plugin and key).
    """

    reductions: ClassVar[dict[str, Reduce]] = {}

    def merge(self, other: Statistic) -> None:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        for attr, op in self.reductions.items():
            setattr(self, attr, _combine(op, getattr(self, attr), getattr(other, attr)))


def reduce_all(copies: list[Statistic]) -> Statistic:
    """What a reduction over processes yields: every copy merged, in rank order, into the first."""
    if not copies:
        raise ValueError("nothing to reduce")
    first = copies[0]
    for other in copies[1:]:
        first.merge(other)
    return first
