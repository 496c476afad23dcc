"""``python -m kvlab ...`` is the ``kvlab`` command."""

import sys

from kvlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
