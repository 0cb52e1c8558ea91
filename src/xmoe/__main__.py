"""``python -m xmoe`` is the ``xmoe`` CLI (also what torchrun launches)."""

import sys

from .cli import main

sys.exit(main())
