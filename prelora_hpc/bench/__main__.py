"""``python -m prelora_hpc.bench``: the same as ``prelora-bench``."""

import sys

from .cli import main

sys.exit(main())
