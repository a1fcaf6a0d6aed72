"""``python -m fedge``: the ``fedge`` command."""

import sys

from fedge.cli import main

sys.exit(main())
