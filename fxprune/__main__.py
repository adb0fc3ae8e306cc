"""``python -m fxprune`` is the ``fxprune`` command."""

import sys

from .cli import main

__all__: list = []

sys.exit(main())
