"""aofp_ext: Approximated Oracle Filter Pruning (Ding et al., ICML 2019) for PyTorch CNNs.

Fused C++/CUDA kernels price many random filter masks in one pass and cut channels in place;
a thin Python driver runs the search. See README.md and docs/.
"""

from . import ops
from ._loader import ExtensionNotBuiltError, build_info

__version__ = "0.1.0"

__all__ = ["ops", "build_info", "ExtensionNotBuiltError", "__version__"]
