"""``python -m lc_kernels.cli``: the same as the ``lc-kernels`` command."""
import sys

from . import main

sys.exit(main())
