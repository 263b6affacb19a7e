"""`python -m examples.bookinfo`: the bookinfo demo (see demo.py; `make demo` runs it)."""

import sys

from examples.bookinfo.demo import main

sys.exit(main())
