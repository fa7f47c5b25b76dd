"""Which installed plugin stands for another tool's option value: looked up in the plugins' declared `aliases`.

Plugins declare e.g. `aliases = {"msmodelslim.w_method": "GPTQ"}`; the compatibility APIs never name an algorithm.
When no installed plugin declares the value, the error says which distribution to install: slimquant's plugin
distributions are named `slimquant-<algorithm>`, and the hint below only names which algorithm that is.
"""

from __future__ import annotations

from slimquant.errors import RecipeError
from slimquant.plugins import find_by_alias

# For error messages only (which distribution to install): what the other tools' option values mean.
INSTALL_HINT = {
    ("msmodelslim.anti_method", "m1"): "smoothquant", ("msmodelslim.anti_method", "m2"): "shift",
    ("msmodelslim.anti_method", "m3"): "awq", ("paddleslim", "Smooth"): "smoothquant",
    ("paddleslim", "Shift"): "shift", ("paddleslim", "PieceWiseSearch"): "piecewise",
    ("msmodelslim.sparse", "co_sparse"): "sparse",
}


def plugin_for(key: str, value: str, where: str) -> str:
    """The name of the installed plugin declaring `aliases[key] == value`, or a RecipeError saying what to install."""
    name = find_by_alias(key, value)
    if name is not None:
        return name
    hint = INSTALL_HINT.get((key, value), str(value).lower())
    raise RecipeError(f"{where}: no installed plugin provides {key.split('.')[-1]}={value!r}; "
                      f"install it: pip install slimquant-{hint}")
