"""`python -m fastpeft`: the same as the `fastpeft` console script."""
import sys

from fastpeft.cli import main

sys.exit(main())
