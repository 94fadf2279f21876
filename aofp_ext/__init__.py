"""aofp_ext: Approximated Oracle Filter Pruning (Ding et al., ICML 2019) for PyTorch CNNs.

Fused C++/CUDA kernels price many random filter masks in one pass and cut channels in place;
a thin Python driver runs the search. See README.md and docs/.
"""

from . import criteria, data, models, ops
from ._loader import ExtensionNotBuiltError, build_info
from .checkpoint import WeightsFileError, load, load_weights, save
from .distributed import DistributedError
from .flops import count_flops
from .graph import ChannelGroup, channel_groups, masked_forward
from .pruner import NonFiniteLossError, PruneResult, accuracy, prune
from .surgery import prune_channels_

__version__ = "0.1.0"

__all__ = [
    "ops", "build_info", "ExtensionNotBuiltError", "__version__",
    "channel_groups", "ChannelGroup", "masked_forward", "prune_channels_", "count_flops",
    "save", "load", "load_weights", "WeightsFileError", "models", "data", "prune", "PruneResult", "NonFiniteLossError", "accuracy",
    "DistributedError", "criteria",
]
