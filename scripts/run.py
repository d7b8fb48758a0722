#!/usr/bin/env python
"""jaxpar's command line. See `python scripts/run.py --help`."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxpar.cli import main  # noqa: E402  (imports no JAX: --devices must act first)

if __name__ == "__main__":
  sys.exit(main())
