"""``python -m lvit``: the ``lvit`` command."""

import sys

from .commands.cli import main

sys.exit(main())
