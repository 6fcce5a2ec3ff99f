"""Weight sparsity: the SparseLayer protocol and its backends, mask methods, algorithms, the Sparsifier."""
from .algorithms import ALGORITHMS, GMP, SET, Algorithm, RigL, Static
from .api import densify, is_sparse_state_dict, load_state_dict, sparsify, state_dict_masks, to_dense_state_dict
from .masks import block_mask, erk_sparsities, magnitude_mask, nm_mask, random_mask
from .methods import ERK, MASK_METHODS, NM, Block, GlobalMagnitude, Magnitude, MaskMethod, Random, UserMask
from .protocol import SparseLayer, sparse_layers
from .schedules import Constant, Cosine, Cubic, Linear, Schedule
from .sparse_linear import SparseLinear
from .sparsifier import TOTAL_ROW, Sparsifier, layer_stats, set_masks

__all__ = [
    "ALGORITHMS", "Algorithm", "Block", "Constant", "Cosine", "Cubic", "ERK", "GMP", "GlobalMagnitude", "Linear",
    "MASK_METHODS", "Magnitude", "MaskMethod", "NM", "Random", "RigL", "SET", "Schedule", "SparseLayer",
    "SparseLinear", "Sparsifier", "Static", "TOTAL_ROW", "UserMask", "block_mask", "densify", "erk_sparsities",
    "is_sparse_state_dict", "layer_stats", "load_state_dict", "magnitude_mask", "nm_mask", "random_mask",
    "set_masks", "sparse_layers", "sparsify", "state_dict_masks", "to_dense_state_dict",
]
