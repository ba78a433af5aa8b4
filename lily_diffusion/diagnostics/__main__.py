"""`python -m lily_diffusion.diagnostics`: the `lily-inspect` console script."""

import sys

from .cli import main

sys.exit(main())
