"""`python -m lily_diffusion.diagnostics`: the `lily-inspect` console script."""

import sys

from .cli import main

if __name__ == "__main__":  # importing the package's modules (pkgutil.walk_packages) must not run it
    sys.exit(main())
