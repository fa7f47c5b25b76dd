"""Budget-driven mixed precision: measure each Linear's sensitivity per candidate width, choose the widths that
lose least under a size budget, and hand the choice to the runtime as per-Linear overrides."""

from slimquant.budget.resolve import BudgetReport, resolve_budget

__all__ = ["BudgetReport", "resolve_budget"]
