import re

import click
import pytest
from click.testing import CliRunner

import cli
from pipeline.config import TrainConfig
from pipeline.io import errors
from pipeline.io.errors import PipelineError


@pytest.mark.parametrize("name", sorted(cli.main.commands))
def test_every_option_is_explained(name):
    command = cli.main.commands[name]
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help and len(param.help) > 10, f"{name} {param.opts}: no help"
    result = CliRunner().invoke(cli.main, [name, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    result = CliRunner().invoke(cli.main, ["evaluate", "--checkpoint", str(tmp_path / "notes.pt")])
    assert result.exit_code == 2
    assert re.fullmatch(
        rf"Error: {re.escape(str(tmp_path))}/notes.pt: not a checkpoint loadable [^\n]+", result.output.strip()
    )


def test_the_library_names_python_arguments_and_the_command_line_its_flags(tmp_path):
    error = PipelineError(
        f"pass another {errors.param('out')}, or {errors.param('compile', 'off')}, "
        f"{errors.param('model.gating', False)}, {errors.param('num_workers', 2)}, "
        f"{errors.param('criterion', 'scst')}, {errors.param('resume', True)}"
    )
    assert str(error) == (
        "pass another `out`, or `compile='off'`, `model.gating=False`, `num_workers=2`, "
        "`criterion='scst'`, `resume=True`"
    )
    assert (
        error.worded(cli.flag)
        == "pass another --out, or --compile off, --no-gating, --workers 2, --objective scst, --resume"
    )
    with pytest.raises(PipelineError, match=r"`criterion='scst'` trains an XE-trained decoder: give .* as `init`"):
        TrainConfig(features="f", out="o", criterion="scst")
    args = ["train", "--objective", "scst", "--features", str(tmp_path), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2
    assert "--objective scst trains an XE-trained decoder: give its checkpoint (RUN/best.pt) as --init" in result.output


@pytest.mark.parametrize(
    "name",
    [n for n, c in cli.main.commands.items() if any(p.required for p in c.params if isinstance(p, click.Option))],
)
def test_a_required_option_left_out_is_named(name, tmp_path, monkeypatch):
    """Each command's first required option, left out, is named as missing (a None default once
    satisfied click's check, and the command failed on None instead)."""
    monkeypatch.chdir(tmp_path)
    command = cli.main.commands[name]
    required = next(p for p in command.params if isinstance(p, click.Option) and p.required)
    arguments = ["x.jpg"] * any(isinstance(p, click.Argument) for p in command.params)
    result = CliRunner().invoke(cli.main, [name, *arguments])
    assert result.exit_code == 2 and f"Missing option '{required.opts[0]}'" in result.output, result.output


def test_default_paths_say_what_to_run_first(tmp_path, monkeypatch):
    """Run where data/ holds nothing (or too much), the commands that fall back on data/ say which
    command makes what they need, or which option chooses; and two captioners are refused."""
    monkeypatch.chdir(tmp_path)

    def line(*args):
        result = CliRunner().invoke(cli.main, list(args))
        assert result.exit_code == 2, result.output
        return result.output.strip()

    assert line("train", "--attention", "hard") == (
        "Error: no features under data/features: run `make features DATASET=flickr8k` (or `python cli.py "
        "features`) first, or pass --features"
    )
    assert line("caption", "img.jpg").startswith("Error: no trained checkpoint under data/runs: train one with")
    for name in ("a", "b"):
        (tmp_path / "data" / "features" / name).mkdir(parents=True)
        (tmp_path / "data" / "features" / name / "manifest.json").write_text("{}")
    assert line("train") == (
        "Error: 2 features folders under data/features (a, b) and none is flickr8k-vgg19: choose one with --features"
    )
    (tmp_path / "best.pt").write_bytes(b"")
    assert line("caption", "img.jpg", "--checkpoint", "best.pt", "--model", "m") == (
        "Error: --checkpoint and --model name two captioners: give one"
    )
    assert not (tmp_path / "data" / "runs").exists()
