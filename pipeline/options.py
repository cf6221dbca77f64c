"""Options defined once: each configuration dataclass field carries its help, unit, choices and
range (:func:`option`), from which `cli.py` generates its click options and against which
:func:`check_config` checks a configuration built in Python; and the resolved options of a run as a
flat TOML file (:func:`write_toml`), which `--config FILE` reads back to repeat it.
"""

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .io.atomic import atomic_path
from .io.errors import PipelineError, describe, param

CONFIG = "config.toml"  # the options a features folder or a run folder was made with (write_toml, read_toml)


@dataclass(frozen=True)
class Spec:
    """What the command line knows of a configuration field.

    help: one sentence or two (for a switch on by default, what its ``--no-NAME`` flag does);
    unit: of the value ('' where it has none); choices: the allowed values; low, high: the
    allowed range, each end open if ``*_open``; kind: 'device' (a torch device this machine has),
    'path' (a file that must exist, or '' for none) or '' (none); flag: the option's name if not
    the field's (``--no-gating`` for ``gating``); cli: False for a field with no option.
    """

    help: str
    unit: str = ""
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    kind: str = ""
    flag: str = ""
    cli: bool = True


def option(default, help: str, **spec):
    """A dataclass field with ``default`` and its :class:`Spec` (keyword arguments as Spec's)."""
    return field(default=default, metadata={"spec": Spec(help, **spec)})


def specs(cls) -> dict:
    """name -> (default, Spec) of the fields of dataclass ``cls`` that have a Spec."""
    out = {}
    for f in dataclasses.fields(cls):
        if "spec" in f.metadata:
            out[f.name] = (f.default, f.metadata["spec"])
    return out


def defaults(cls) -> dict:
    """name -> default of the fields of dataclass ``cls`` that have a Spec (:func:`specs`)."""
    return {name: default for name, (default, _) in specs(cls).items()}


def flag_name(name: str, default, spec: Spec) -> str:
    """The option's name on the command line: ``--embed-dim``; a switch on by default is turned
    off by ``--no-NAME``."""
    if spec.flag:
        return spec.flag
    base = name.replace("_", "-")
    return f"--no-{base}" if default is True else f"--{base}"


def field_flag(cls, name: str) -> str:
    """The command-line flag of field ``name`` of dataclass ``cls`` (:func:`flag_name`)."""
    default, spec = specs(cls)[name]
    return flag_name(name, default, spec)


def problem(value, default, spec: Spec) -> str | None:
    """Why ``value`` is not allowed by ``spec`` for a field whose default is ``default`` (None if it is)."""
    if spec.choices and value not in spec.choices:
        return f"{value!r} is not one of {', '.join(map(str, spec.choices))}"
    if isinstance(default, bool) and not isinstance(value, bool):
        return f"{value!r} is not true or false"
    if (
        isinstance(default, int)
        and not isinstance(default, bool)
        and (isinstance(value, bool) or not isinstance(value, int))
    ):
        return f"{value!r} is not an integer"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value!r} is not a finite number"
    below = spec.low is not None and (value <= spec.low if spec.low_open else value < spec.low)
    above = spec.high is not None and (value >= spec.high if spec.high_open else value > spec.high)
    if below or above:
        return f"{value} is not in the range {range_text(spec)}"
    return None


def range_text(spec: Spec) -> str:
    """'0<x<=1', 'x>=1', ... as click writes ranges."""
    left = "" if spec.low is None else f"{spec.low:g}{'<' if spec.low_open else '<='}"
    right = "" if spec.high is None else f"{'<' if spec.high_open else '<='}{spec.high:g}"
    return f"{left}x{right}"


def check_config(config, prefix: str = "") -> None:
    """Raise PipelineError naming the first field of dataclass instance ``config`` whose value its
    Spec does not allow (a configuration built in Python, not through the command line)."""
    check_values(type(config), {name: getattr(config, name) for name in specs(type(config))}, prefix)


def check_values(cls, values: dict, prefix: str = "") -> None:
    """Raise PipelineError naming the first of ``values`` (field name -> value) that is not a field
    of dataclass ``cls``, or whose value the field's Spec does not allow."""
    fields, known = {f.name for f in dataclasses.fields(cls)}, specs(cls)
    for name, value in values.items():
        if name not in fields:
            raise PipelineError(f"{prefix}{name}: not a field of {cls.__name__}")
        if name in known:
            default, spec = known[name]
            why = problem(value, default, spec)
            if why:
                raise PipelineError(f"{prefix}{param(name)}: {why}")


def read_toml(path) -> dict:
    """The options in a TOML file (``--config``): one flat table of option names (as in
    ``config.toml``, underscores or dashes) and values. Raises PipelineError if unreadable."""
    try:
        values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise PipelineError(f"{path}: not a readable TOML file of options ({describe(e)})") from None
    nested = [k for k, v in values.items() if isinstance(v, dict)]
    if nested:
        raise PipelineError(f"{path}: options are one flat table; [{nested[0]}] is not an option")
    return {k.replace("-", "_"): v for k, v in values.items()}


def write_toml(path, values: dict, heading: str) -> None:
    """Write ``values`` (name -> str, int, float or bool; None left out) as a flat TOML table at
    ``path``, atomically, under a comment ``heading``."""
    lines = [f"# {line}" for line in heading.splitlines()]
    for name, value in values.items():
        if value is not None:
            text = ("true" if value else "false") if isinstance(value, bool) else json.dumps(value)
            lines.append(f"{name} = {text}")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def nest(options: dict, sections: dict) -> dict:
    """Flat options, as the command line and config.toml name them ('lr', 'embed_dim'), as a
    configuration's fields: those of each dataclass of ``sections`` (name -> class, e.g.
    ``pipeline.config.SECTIONS``) gathered under its name. The inverse of :func:`flatten`."""
    known = {name: specs(cls) for name, cls in sections.items()}
    nested = {name: {k: v for k, v in options.items() if k in known[name]} for name in sections}
    taken = {k for values in nested.values() for k in values}
    return dict({k: v for k, v in options.items() if k not in taken}, **nested)


def flatten(fields: dict, sections, dotted: bool = False) -> dict:
    """A configuration's fields (as ``asdict`` gives them) as flat options: those under the names
    in ``sections`` brought up ({'lr': ..., 'model': {'embed_dim': ...}} -> {'lr': ..., 'embed_dim':
    ...}), as 'model.embed_dim' where ``dotted``."""
    flat = {}
    for key, value in fields.items():
        if key in sections:
            flat.update({f"{key}.{k}" if dotted else k: v for k, v in value.items()})
        else:
            flat[key] = value
    return flat
