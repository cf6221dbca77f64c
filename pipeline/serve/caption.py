"""Captioning image files for the command line: a :class:`~pipeline.captioner.Captioner` one
image at a time, and the files written beside (attention figures, JSON lines), each checked
before any work.

Results come one image at a time, as each is done, so a caller that prints or saves them as they
come keeps everything finished when it is interrupted.
"""

import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ..captioner import Captioner
from ..config import DECODE, DecodeConfig
from ..features.images import ImageError
from ..io.atomic import temp_name
from ..io.errors import PipelineError, param
from ..io.folders import OWNER, check_writable, refuse_foreign
from ..model.compiled import decide_decoding
from ..plots import is_attention_figure


@dataclass
class ImageCaption:
    """The result for one image file: its caption, or the reason it could not be read."""

    path: Path
    caption: str | None = None
    log_prob: float | None = None
    plot: Path | None = None
    error: str | None = None

    def to_json(self) -> str:
        """One JSON line: image, caption, log_prob (natural log), plot, error."""
        return json.dumps(
            {
                "image": str(self.path),
                "caption": self.caption,
                "log_prob": self.log_prob,
                "plot": str(self.plot) if self.plot else None,
                "error": self.error,
            }
        )


def plot_path(pattern: Path, image: Path, many: bool) -> Path:
    """``pattern`` itself for one image (``out.png``); ``out-IMAGESTEM.png`` for each of several
    (``.png`` where ``pattern`` has no suffix)."""
    return pattern.with_name(f"{pattern.stem}-{image.stem}{pattern.suffix or '.png'}") if many else pattern


def plot_paths(paths: list[Path], pattern, inputs: list[Path]) -> list[Path | None]:
    """The figure path of each image (all None without ``pattern``), checked before any work:
    names must differ (two images of one stem would share a figure), none may be an input
    (``inputs``: the images and the checkpoint), and a file already there must be an attention
    figure this pipeline drew. Raises PipelineError naming the offending path."""
    if pattern is None:
        return [None] * len(paths)
    plots = [plot_path(Path(pattern), p, len(paths) > 1) for p in paths]
    taken = {p.resolve() for p in inputs}
    seen = {}
    for image, plot in zip(paths, plots):
        if plot.resolve() in seen:
            raise PipelineError(
                f"{plot}: the attention figures of {seen[plot.resolve()]} and {image} would share this "
                "name (the same file stem); caption them in separate commands"
            )
        seen[plot.resolve()] = image
        if plot.resolve() in taken:
            raise PipelineError(f"{plot}: is an input of this command; pass another {param('attention_plot')}")
        if plot.exists() and not is_attention_figure(plot):
            refuse_foreign(plot, "`cli.py caption` (not one of its attention figures)", "attention_plot")
        check_writable(plot.parent, "attention_plot")
    return plots


def check_jsonl(path: Path, taken: list[Path]) -> None:
    """Refuse ``path`` for ``--jsonl`` if it is one of ``taken`` (the command's inputs and figures)
    or an existing file whose first line is not the header this pipeline writes; check its folder
    is writable. Raises PipelineError naming it."""
    if path.resolve() in {p.resolve() for p in taken}:
        raise PipelineError(
            f"{path}: is an input or an attention figure of this command; pass another {param('jsonl')}"
        )
    if path.exists():
        try:
            with open(path, encoding="utf-8") as f:
                ours = json.loads(f.readline()).get("written_by") == OWNER
        except (ValueError, AttributeError, UnicodeDecodeError):
            ours = False
        if not ours:
            refuse_foreign(path, "`cli.py caption`", "jsonl")
    check_writable(path.parent, "jsonl")


class JsonLines:
    """The ``--jsonl`` file, as a context manager: a header line (``header`` and this pipeline's
    mark), then :meth:`write` a line per result, each flushed, into ``PATH.tmp-PID``, which
    replaces ``path`` when the block ends, also when it ends by Ctrl-C or SIGTERM (the lines done
    are kept; SIGTERM is Ctrl-C's KeyboardInterrupt within the block). A block that ends, however,
    before any result was written leaves a file at ``path`` as it was (the header-only one is removed). A
    killed command (SIGKILL) leaves ``path`` as it was and its finished lines in ``PATH.tmp-PID``."""

    def __init__(self, path, header: dict):
        self.path = Path(path)
        self.tmp = temp_name(self.path)
        self.file = open(self.tmp, "w", encoding="utf-8")
        self.file.write(json.dumps(dict(header, written_by=OWNER)) + "\n")
        self.results = 0

    def write(self, line: str) -> None:
        """Append one result's JSON line, flushed."""
        self.file.write(line + "\n")
        self.file.flush()
        self.results += 1

    def __enter__(self) -> "JsonLines":
        self.on_sigterm = signal.signal(signal.SIGTERM, _interrupt)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self.on_sigterm)
        self.file.close()
        if not self.results and self.path.exists():  # stopped before any result: keep the file there
            self.tmp.unlink()
        else:
            os.replace(self.tmp, self.path)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def caption_images(
    paths, checkpoint=None, model=None, settings: DecodeConfig = DECODE, plot=None, device: str = "cpu", jsonl=None
) -> Iterator[ImageCaption]:
    """Caption each image file with the :class:`~pipeline.captioner.Captioner` of a checkpoint
    (or of a model folder or Hub id, ``model``): returns an iterator that yields each result as
    soon as it is done; unreadable files get an ``error`` and the others go on. settings: beam
    search's.

    plot: where to save attention figures (see :func:`plot_path`), or None; jsonl: where the
    caller will write the results as JSON lines (:class:`JsonLines`), or None. Both are checked
    (:func:`plot_paths`, :func:`check_jsonl`) and the captioner loaded by this call, before it
    returns: a caller may start writing its outputs once it has returned.
    Raises PipelineError for an unusable checkpoint, model, figure path or JSON lines path.
    """
    paths = [Path(p) for p in paths]
    inputs = [*paths, *(Path(p) for p in (checkpoint, model) if p)]
    plots = plot_paths(paths, plot, inputs)
    if jsonl:
        check_jsonl(Path(jsonl), [*inputs, *(p for p in plots if p)])
    captioner = Captioner.from_source(checkpoint, model, device)
    on = decide_decoding(settings, device, len(paths), note=False)  # a caption line per image, no note
    return _caption_each(captioner, paths, plots, replace(settings, compile="on" if on else "off"))


def _caption_each(
    captioner: Captioner, paths: list[Path], plots: list, settings: DecodeConfig
) -> Iterator[ImageCaption]:
    for path, plot_file in zip(paths, plots):
        try:
            caption = captioner([path], **vars(settings))[0]
        except ImageError as e:
            yield ImageCaption(path, error=e.reason)
            continue
        if plot_file is not None:
            captioner.attention_figure(caption, plot_file)
        yield ImageCaption(path, caption.text, caption.log_prob, plot_file)
