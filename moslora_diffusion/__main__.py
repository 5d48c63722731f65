"""``python -m moslora_diffusion``: the ``moslora`` command."""

import sys

from . import _warnings  # noqa: F401  (library notices that are not the user's concern)
from .cli import main

sys.exit(main())
