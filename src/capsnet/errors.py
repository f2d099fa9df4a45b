"""The one exception type the command line turns into a one-line message."""


class CapsNetError(Exception):
    """A problem with the user's input or files: reported as one line, never a traceback."""
