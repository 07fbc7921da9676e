"""`python -m star_runtime.serve`: star-serve."""

import sys

from star_runtime.serve.cli import main

sys.exit(main())
