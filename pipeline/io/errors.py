"""The one exception type the command line turns into a one-line message."""


class PipelineError(Exception):
    """A problem with the user's input or environment, worded as what happened and what to do.

    ``cli.py`` prints the message (no traceback) and exits with status 2.
    """


def describe(error: Exception) -> str:
    """``TypeName: first line of the message`` (at most 200 characters), for wrapping a library's
    exception into a PipelineError's one line."""
    first = (str(error).splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def one_line(error: Exception) -> str:
    """The message of ``error`` as one line. A DataLoader worker's error arrives re-raised with
    the worker's traceback in its message; its last line holds the original message."""
    text = str(error)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split("Error: ", 1)[-1] if "Error: " in last else last
    return " ".join(text.split("\n"))
