"""`python -m gra_async`."""

from __future__ import annotations

import sys

from gra_async.cli import main

if __name__ == "__main__":
    sys.exit(main())
