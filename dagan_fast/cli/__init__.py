"""The ``dagan-fast`` command line: ``app`` (the dispatcher and its subcommands), ``convert``, ``demo``
(the main job), ``ops_demo`` and ``errors``."""
from .app import build_parser, main
from .errors import CommandError

__all__ = ["main", "build_parser", "CommandError"]
