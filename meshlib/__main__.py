"""`python -m meshlib`: the `meshlib` command, where the console script is not on the PATH."""

from __future__ import annotations

import sys

from meshlib.cli import main

if __name__ == "__main__":
    sys.exit(main())
