"""Errors a user can act on. Each names what is wrong; the CLI maps them to exit code 2 (bad input)."""


class SlimquantError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""


class RecipeError(SlimquantError, ValueError):
    """The recipe or configuration is invalid."""


class PluginError(SlimquantError):
    """A plugin is unknown, broken, or misdeclared."""


class ModelStructureError(SlimquantError):
    """The model lacks something the recipe asks for (a layer name, a norm to smooth through, ...)."""


class CalibrationError(SlimquantError):
    """The calibration data is missing, empty or unusable."""


class NonFiniteError(SlimquantError):
    """A weight or activation holds NaN or Inf."""


class OutputError(SlimquantError):
    """An output path exists, is corrupt, or cannot be written."""


class CheckpointError(SlimquantError):
    """A resume checkpoint is corrupt, of another run, or in the way of a fresh run."""


class ProcessGroupError(SlimquantError):
    """Another process of a torch.distributed run stopped, or gave no answer within the collective timeout."""
