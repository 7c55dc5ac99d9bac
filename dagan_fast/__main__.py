"""``python -m dagan_fast COMMAND ...``: the same as the ``dagan-fast`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
