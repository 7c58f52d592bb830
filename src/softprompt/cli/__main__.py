"""``python -m softprompt.cli``: the same entry point as the ``softprompt`` console script (used by launchers)."""

import sys

from softprompt.cli.app import main

sys.exit(main())
