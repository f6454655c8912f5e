"""`python -m kerasft` is the `kerasft` command."""

import sys

from kerasft.cli import main

sys.exit(main())
