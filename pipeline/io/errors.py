"""The exception and warning types the command line turns into one-line messages, and how their
messages name options: as the Python argument for a library user, as the flag for cli.py's."""

import re
from collections.abc import Callable

_OPTION = re.compile("\x1f([A-Za-z_.]+)\x1e([^\x1e]*)\x1e([^\x1f]*)\x1f")


def param(name: str, value=None) -> str:
    """An option named inside an error message: ``name`` is its configuration field (or keyword
    argument: ``out``, ``val_split``), ``value`` the value to give it where the message proposes
    one. :class:`PipelineError` shows it as Python (``out``, ``compile='off'``); cli.py words it
    as the flag (``--out``, ``--compile off``) through :meth:`Worded.worded`."""
    python = f"`{name}`" if value is None else f"`{name}={value!r}`"
    return f"\x1f{name}\x1e{'' if value is None else value}\x1e{python}\x1f"


def worded(text: str, flag: Callable[[str, str], str] | None = None) -> str:
    """``text`` with each option named in it by :func:`param` as ``flag(name, value)`` (value ''
    where none is proposed), or as Python where ``flag`` is None."""
    return _OPTION.sub(lambda m: m[3] if flag is None else flag(m[1], m[2]), text)


class Worded:
    """A message that names options with :func:`param`: ``str()`` shows them as Python names,
    :meth:`worded` as the caller words them (cli.py: as flags)."""

    def __str__(self) -> str:
        return self.worded()

    def worded(self, flag: Callable[[str, str], str] | None = None) -> str:
        """The message, its options worded by ``flag`` (:func:`worded`)."""
        return worded(str(self.args[0]) if self.args else "", flag)


class PipelineError(Worded, Exception):
    """A problem with the user's input or environment, worded as what happened and what to do.

    ``cli.py`` prints :meth:`~Worded.worded` with its flags (no traceback) and exits with status 2.
    """


class PipelineWarning(Worded, UserWarning):
    """Something the user may want to change, that does not stop the command (``warnings.warn``)."""


def describe(error: Exception) -> str:
    """``TypeName: first line of the message`` (at most 200 characters), for wrapping a library's
    exception into a PipelineError's one line."""
    first = (str(error).splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def one_line(error: Exception, flag: Callable[[str, str], str] | None = None) -> str:
    """The message of ``error`` as one line (a PipelineError's options worded by ``flag``, as
    :meth:`Worded.worded`). A DataLoader worker's error arrives re-raised with the worker's
    traceback in its message; its last line holds the original message."""
    text = error.worded(flag) if isinstance(error, Worded) else str(error)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split("Error: ", 1)[-1] if "Error: " in last else last
    return " ".join(text.split("\n"))
