"""`python -m control.cli`: the `airlock` command (how `airlock up --detach` starts its daemon)."""

import sys

from control.cli import main

sys.exit(main())
