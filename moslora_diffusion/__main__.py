"""``python -m moslora_diffusion``: the ``moslora`` command."""

import sys

from .cli import main

sys.exit(main())
