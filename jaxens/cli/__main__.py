"""``python -m jaxens.cli``: the ``jaxens`` command."""

import sys

from jaxens.cli import main

sys.exit(main())
