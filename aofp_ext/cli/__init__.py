"""The ``aofp`` command line: ``aofp prune | eval | demo | bench | info``.

:mod:`.parser` (the arguments) -> a command: :mod:`.commands` (``prune``, ``eval``, ``bench``,
``info``; the model and data of ``prune`` and ``eval`` from :mod:`.build`) or :mod:`.demo`
(the LeNet-5-BN demo; ``--pricing``: :mod:`.pricing_demo`). Also ``python -m aofp_ext.cli``.
"""

from __future__ import annotations

import sys

from .parser import build_parser

__all__ = ["main", "build_parser"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)
