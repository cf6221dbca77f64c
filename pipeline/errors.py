"""The one exception type the command line turns into a one-line message."""


class PipelineError(Exception):
    """A problem with the user's input or environment, worded as what happened and what to do.

    ``cli.py`` prints the message (no traceback) and exits with status 2.
    """
