"""The one exception type the CLI turns into a one-line message (no traceback)."""


class EdgeTIError(Exception):
    """A problem with the user's input: a file, a folder, an option. The message names it."""
