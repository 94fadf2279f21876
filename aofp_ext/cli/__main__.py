"""``python -m aofp_ext.cli``: the ``aofp`` command (how ``--nproc`` relaunches it under
torchrun)."""

import sys

from . import main

sys.exit(main())
