"""Static weight sparsity: masks, sparse linear layers, sparsify()/densify() and the Sparsifier."""
from .masks import METHODS, block_mask, erk_sparsities, magnitude_mask, make_mask, nm_mask, random_mask
from .sparse_linear import SparseLinear
from .sparsifier import (Sparsifier, densify, layer_stats, load_state_dict, sparse_layers, sparsify,
                         to_dense_state_dict)

__all__ = [
    "METHODS", "SparseLinear", "Sparsifier", "block_mask", "densify", "erk_sparsities", "layer_stats",
    "load_state_dict", "magnitude_mask", "make_mask", "nm_mask", "random_mask", "sparse_layers", "sparsify",
    "to_dense_state_dict",
]
