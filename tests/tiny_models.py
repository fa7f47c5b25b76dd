"""The tiny test models now live in slimquant.testing, for third-party plugins' tests too."""

from slimquant.testing.models import ARCHS, CONFIGS, HIDDEN, MOE_ARCHS, VOCAB, tiny_model, token_samples

__all__ = ["ARCHS", "CONFIGS", "HIDDEN", "MOE_ARCHS", "VOCAB", "tiny_model", "token_samples"]
