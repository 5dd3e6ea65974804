"""`python -m advgen.cli`, as the `advgen` command."""
import sys

from . import main

sys.exit(main())
