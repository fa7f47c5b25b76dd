"""Helpers for plugin tests, slimquant's own and third parties': tiny random models of every test architecture and
the contract check (`check_plugin`, for algorithms and exporters); `slimquant.testing.smoothing` has the checks for
smoothing plugins."""

from slimquant.testing.contract import ContractError, check_declaration, check_exporter, check_plugin, check_run
from slimquant.testing.models import ARCHS, MOE_ARCHS, VOCAB, tiny_model, token_samples

__all__ = ["ARCHS", "MOE_ARCHS", "VOCAB", "ContractError", "check_declaration", "check_exporter", "check_plugin",
           "check_run", "tiny_model", "token_samples"]
