"""`python -m entrypoints.merge ...`: the standalone merge (entrypoints/merge/cli.py)."""

import sys

from entrypoints.merge.cli import main

sys.exit(main())
