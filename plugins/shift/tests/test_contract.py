"""slimquant's plugin contract, checked on representative architectures."""

from slimquant.testing import check_declaration, check_plugin
from slimquant_shift.plugin import ShiftPlugin


def test_declaration():
    check_declaration(ShiftPlugin)
    assert ShiftPlugin.requires_calibration_data
    assert "paddleslim" in ShiftPlugin.aliases


# the smoothing equivalence itself is tested on every architecture in test_shift.py
ARCHS = ("llama", "opt", "gpt2", "phi", "qwen2_moe")


def test_contract_with_w8a8():
    changes = check_plugin(ShiftPlugin, scheme="W8A8_DYNAMIC", archs=ARCHS)
    assert all(change < 0.5 for change in changes.values()), changes
