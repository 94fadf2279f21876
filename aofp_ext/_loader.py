"""Loads the compiled extension once; a missing or broken build becomes one clear error."""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

_C = None
_IMPORT_ERROR: BaseException | None = None
try:
    from . import _C  # type: ignore[attr-defined,no-redef]
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _IMPORT_ERROR = exc


class ExtensionNotBuiltError(RuntimeError):
    """The compiled part of aofp_ext (aofp_ext._C) could not be loaded."""


def require_C():
    """Return the compiled module or raise one clear error that says how to fix the install."""
    if _C is None:
        raise ExtensionNotBuiltError(
            "aofp_ext._C, the compiled kernels of aofp_ext, could not be loaded "
            f"({_IMPORT_ERROR!r}). Reinstall from the source tree with "
            "`pip install torch==<your torch> && pip install --no-build-isolation -e .` "
            "using the same Python and torch as now. The pure-PyTorch reference ops in "
            "aofp_ext.ops.reference work without it."
        )
    return _C


def build_info() -> dict:
    """What the compiled extension was built with: torch version, CUDA kernels, architectures."""
    return dict(require_C().build_info())
