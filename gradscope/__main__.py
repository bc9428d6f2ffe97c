"""`python -m gradscope ...` runs the `gradscope` command."""

import sys

from .cli import main

sys.exit(main())
