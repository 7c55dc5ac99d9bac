"""The one exception every subcommand raises for problems the user can fix."""


class CommandError(Exception):
    """A problem the user can fix (bad option, unwritable path): printed as ``dagan-fast <cmd>: error: ...``."""
