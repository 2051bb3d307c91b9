"""`python -m entrypoints.demo`: the local end-to-end demo (entrypoints/demo/run.py)."""

import sys

from entrypoints.demo.run import main

sys.exit(main())
