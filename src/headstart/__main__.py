"""``python -m headstart`` (and ``torchrun ... -m headstart``): the ``headstart`` command."""

import sys

from .cli import main

sys.exit(main())
