"""python -m entrypoints.chat --model URI [--prompt TEXT]   (the options: entrypoints/chat/cli.py)"""

import sys

from entrypoints.chat.cli import main

sys.exit(main())
