"""`python -m advgen ...` is the `advgen` command."""
import sys

from .cli import main

sys.exit(main())
