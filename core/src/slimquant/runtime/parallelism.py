"""A run on several processes (torch.distributed): what is refused, the row block or cluster of Linears each
process quantizes, and the statistics combined across processes. In one process every Linear is quantized whole
here and nothing is combined."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from slimquant.config.recipe import Recipe
from slimquant.config.scheme import Strategy
from slimquant.errors import PluginError, RecipeError
from slimquant.plugins import AlgorithmPlan, PluginSet, linear_cost, row_parallel, runs_distributed
from slimquant.quant.qweight import QuantizedWeight
from slimquant.runtime import distributed
from slimquant.runtime.context import LayerContext
from slimquant.runtime.plan import LinearPlan
from slimquant.stats import Statistic

_CHECK_STATISTICS = contextvars.ContextVar("slimquant_check_statistics", default=False)


@contextlib.contextmanager
def statistics_checked() -> Iterator[None]:
    """Within the block a run in one process refuses what a run on several would leave uncombined
    (`check_reducible_state`); slimquant.testing.check_plugin runs under it."""
    token = _CHECK_STATISTICS.set(True)
    try:
        yield
    finally:
        _CHECK_STATISTICS.reset(token)


def _uncombined(value, path: str):
    """(path, what) for each tensor in a plugin's layer state outside a Statistic: in a dict, list or tuple, or in
    the attributes of an object that is not a Statistic. A QuantizedWeight (a result, kept for a sibling) is not a
    statistic."""
    if isinstance(value, Statistic | QuantizedWeight):
        return
    if torch.is_tensor(value):
        yield path, "a tensor"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _uncombined(item, f"{path}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _uncombined(item, f"{path}[{i}]")
    elif any(torch.is_tensor(v) for v in getattr(value, "__dict__", {}).values()):
        yield path, f"a {type(value).__name__} (not a Statistic)"


def _state_owner(key: str, plugins: PluginSet) -> str | None:
    """The plugin a ctx.state key belongs to: its name, or its name and a suffix (``"piecewise.sample"``)."""
    return next((n for n in plugins.plugins if key == n or key.startswith(f"{n}.")), None)


def check_reducible_state(states: dict[str, dict], plugins: PluginSet) -> None:
    """Refuse a tensor that a plugin declaring `distributed` keeps in its layer state outside a Statistic: a run on
    several processes combines only Statistics, and would leave it as each process saw its share of the data."""
    for key, state in states.items():
        owner = _state_owner(key, plugins)
        if owner is None or not runs_distributed(plugins.get(owner)):
            continue
        for path, what in _uncombined(state, ""):
            raise PluginError(f"plugin {owner!r} declares distributed = True but keeps {what} at "
                              f"ctx.state({key!r}){path}: only slimquant.stats.Statistic objects are combined across "
                              "processes; keep it in a Statistic subclass that declares its reductions")


def _statistics(value):
    """The Statistic objects in a plugin's layer state (nested in dicts, lists and tuples)."""
    if isinstance(value, Statistic):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _statistics(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _statistics(item)


def check_distributed(ranks: distributed.Ranks, recipe: Recipe, algorithms: AlgorithmPlan, lazy: bool) -> None:
    """Refuse, before any work, what a run on `ranks.size` processes cannot do."""
    problems = [f"plugin {name!r} does not declare that it runs on several processes (its statistics or "
                "searches are per process)" for name, plugin in algorithms.plugins.plugins.items()
                if not runs_distributed(plugin)]
    if lazy:
        problems.append("lazy loading runs in one process")
    if recipe.runtime.checkpoint_dir is not None:
        problems.append("resume checkpoints are written by one process: leave out runtime.checkpoint_dir")
    if algorithms.cache is not None:
        problems.append("a quantized attention cache is calibrated in one process")
    if problems:
        raise RecipeError(f"this run has {ranks.size} processes (torch.distributed), but:\n  "
                          + "\n  ".join(problems) + "\nrun a single process")


class Parallelism:
    """The processes of a run and this layer's share of the work: the statistics already combined (`reduced`),
    the Linear -> process owning it while a group is quantized cluster by cluster (`owners`), and the ordinal of
    the input tensor each Linear read in this layer's observation (`input_order`; Linears reading one tensor form
    one cluster)."""

    def __init__(self, ranks: distributed.Ranks, plugins: PluginSet, plans: dict[str, LinearPlan | None],
                 device: torch.device):
        self.ranks = ranks
        self.plugins = plugins
        self.plans = plans
        self.device = device
        self.reduced: list[Statistic] = []
        self.owners: dict[str, int] | None = None
        self.input_order: dict[str, int] = {}
        self.inputs_seen = 0

    def start_layer(self) -> None:
        self.reduced = []
        self.input_order, self.inputs_seen = {}, 0

    def row_blocks(self, name: str, rows: int) -> slice:
        plan = self.plans[name]
        if (self.ranks.several and self.owners is None and row_parallel(self.plugins.get(plan.weight_algorithm))
                and plan.scheme.weights.strategy != Strategy.TENSOR):  # a tensor-wide scale ties every row
            return self.ranks.row_block(rows)
        return slice(0, rows)

    def reduce_statistics(self, ctx: LayerContext) -> None:
        """Every process's statistics of this layer combined, as each Statistic class declares (once each)."""
        if self.ranks.several or _CHECK_STATISTICS.get():
            check_reducible_state(ctx._state, self.plugins)
        if not self.ranks.several:
            return
        for plugin, state in ctx._state.items():
            for stat in _statistics(state):
                if not any(stat is done for done in self.reduced):
                    distributed.reduce_statistic(stat, self.device, plugin)
                    self.reduced.append(stat)

    def cluster_owners(self, ctx: LayerContext, group: list[str]) -> dict[str, int] | None:
        if not self.ranks.several or any(ctx.grid(n) is not None for n in group):
            return None
        clusters: dict[object, list[str]] = {}
        for name in group:  # a Linear no observation reached is a cluster of its own
            clusters.setdefault(self.input_order.get(name, name), []).append(name)
        if len(clusters) < 2 * self.ranks.size:
            return None
        costs = [linear_cost(self.plugins.get(ctx.plans[names[0]].weight_algorithm),
                             sum(ctx.module(n).out_features for n in names), ctx.module(names[0]).in_features)
                 for names in clusters.values()]
        return distributed.assign_owners(list(clusters.values()), costs, self.ranks)
