"""Filter-selection criteria for ``prune(method=...)`` other than the AOFP search.

See :mod:`aofp_ext.criteria.base` for the interface and docs/methods.md for every method.
"""

from . import simple  # noqa: F401  (registers l1, bn_scale, random)
from . import lfe, oracle, taylor  # noqa: F401  (registers lfe, oracle, oracle-loss, taylor)
from . import agent, functional  # noqa: F401  (registers agent, functional)
from .base import CRITERIA, Criterion, SelectionContext, available, get_criterion, register
from .ranking import removal_order, select_by_ranking

__all__ = ["Criterion", "SelectionContext", "register", "get_criterion", "available",
           "CRITERIA", "select_by_ranking", "removal_order"]
