"""slimquant's plugin contract, checked on representative architectures."""

from slimquant.testing import check_declaration, check_plugin
from slimquant_smoothquant.plugin import SmoothQuantPlugin


def test_declaration():
    check_declaration(SmoothQuantPlugin)
    assert SmoothQuantPlugin.requires_calibration_data
    assert "paddleslim" in SmoothQuantPlugin.aliases


# the smoothing equivalence itself is tested on every architecture in test_smoothquant.py
ARCHS = ("llama", "opt", "gpt2", "phi", "qwen2_moe")


def test_contract_with_w8a8():
    changes = check_plugin(SmoothQuantPlugin, scheme="W8A8_DYNAMIC", archs=ARCHS)
    assert all(change < 0.5 for change in changes.values()), changes
