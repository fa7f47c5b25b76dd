"""slimquant-sparse: SparseGPT pruning fused with quantization (`sparse` plugin), outliers kept at 16 bits."""

from slimquant_sparse.disk import SavedSparsity, bytes_on_disk, saved_sparsity
from slimquant_sparse.magnitude import magnitude_prune_quantize
from slimquant_sparse.plugin import SparsePlugin
from slimquant_sparse.settings import SparseSettings
from slimquant_sparse.sparsegpt import sparsegpt_quantize

__all__ = ["SavedSparsity", "SparsePlugin", "SparseSettings", "bytes_on_disk", "magnitude_prune_quantize",
           "saved_sparsity", "sparsegpt_quantize"]
