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
    """Base class: declare `reductions`; override `merge` only for `Reduce.MERGE` attributes."""

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
