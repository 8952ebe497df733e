"""``python -m incrementer_fast``: the ``incrementer-fast`` command."""
import sys

from .cli import main

sys.exit(main())
