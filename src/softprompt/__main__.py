"""``python -m softprompt``: the same entry point as the ``softprompt`` console script."""

import sys

from softprompt.cli.app import main

sys.exit(main())
