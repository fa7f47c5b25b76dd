"""slimquant's plugin contract, checked on representative architectures."""

from slimquant.testing import check_declaration, check_plugin
from slimquant_piecewise.plugin import PieceWiseSearchPlugin


def test_declaration():
    check_declaration(PieceWiseSearchPlugin)
    assert PieceWiseSearchPlugin.requires_calibration_data
    assert "paddleslim" in PieceWiseSearchPlugin.aliases


# the smoothing equivalence itself is tested on every architecture in test_piecewise.py
ARCHS = ("llama", "opt", "gpt2", "phi", "qwen2_moe")


def test_contract_with_w8a8():
    changes = check_plugin(
        PieceWiseSearchPlugin,
        args={"search_alpha_step": 0.2, "search_scale_step": 2.0, "sample_tokens": 64},
        scheme="W8A8_DYNAMIC",
        archs=ARCHS,
    )
    assert all(change < 0.5 for change in changes.values()), changes
