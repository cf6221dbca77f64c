"""Every command the README shows works as written: the ones that need no dataset run (the Python
example, `caption` and `export` on a trained checkpoint), and every other `python cli.py` and
`make` command, with the `cli.py` commands each make target runs, parses: its command, flags and
values are all accepted."""

import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

import cli

from conftest import ROOT

README = ROOT / "README.md"
RUN_FOR_REAL = {"caption", "export"}  # need only a checkpoint and images
SHELL_OPERATORS = {"&&", "||", ";", "|", ">", "2>&1"}


def fenced(language: str) -> list[str]:
    """The README's fenced blocks of ``language``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)


def commands() -> list[list[str]]:
    """Each command of the README's bash blocks as its words (continuation lines joined, comments dropped)."""
    found = []
    for block in fenced("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                found.append(words)
    return found


def test_the_readme_is_a_reference():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300 and len(text.encode()) <= 25 * 1024
    assert [w[:2] for w in commands()[:2]] == [["make", "demo"], ["make", "test"]]  # the two set-up commands first


def _placeholders(folder: Path, args: list[str]) -> None:
    """Empty files (or folders) in ``folder`` for the paths ``args`` name, so that options which
    must name an existing file parse."""
    for arg in args:
        value = arg.split("=", 1)[-1]
        if "/" in value or re.search(r"\.(jpg|png|pt|json|toml)$", value):
            path = folder / value
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            else:
                path.mkdir(parents=True, exist_ok=True)


def parse(args: list[str], folder: Path) -> None:
    """Parse ``cli.py ARGS`` as click would run it, without running it (cwd ``folder``)."""
    _placeholders(folder, args)
    with click.Context(cli.main) as parent:
        command = cli.main.get_command(parent, args[0])
        assert command is not None, f"no command {args[0]!r}"
        command.make_context(args[0], args[1:], parent=parent)


def test_every_command_parses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checked = 0
    for words in commands():
        if words[:2] == ["python", "cli.py"]:
            parse(words[2:], tmp_path)
        elif words[0] == "make":
            dry = subprocess.run(["make", "-n", "-C", str(ROOT), *words[1:]], capture_output=True, text=True)
            assert dry.returncode == 0, f"{' '.join(words)}: {dry.stderr}"
            for line in dry.stdout.replace("\\\n", " ").splitlines():
                run = shlex.split(line)
                if "cli.py" in run:
                    args = run[run.index("cli.py") + 1 :]
                    parse(list(itertools.takewhile(lambda w: w not in SHELL_OPERATORS, args)), tmp_path)
        else:
            pytest.fail(f"README command of no known kind: {' '.join(words)}")
        checked += 1
    assert checked >= 15


@pytest.fixture
def readme_folder(trained_run, tmp_path):
    """A folder laid out as the README's examples assume: data/runs/flickr8k-vgg19-hard/best.pt and img.jpg."""
    out, root = trained_run
    (tmp_path / "data/runs/flickr8k-vgg19-hard").mkdir(parents=True)
    shutil.copy(out / "run" / "best.pt", tmp_path / "data/runs/flickr8k-vgg19-hard/best.pt")
    shutil.copy(next(root.rglob("*.jpg")), tmp_path / "img.jpg")
    return tmp_path


def test_commands_that_need_no_dataset_run(readme_folder):
    ran = []
    for words in commands():
        if words[:2] != ["python", "cli.py"] or words[2] not in RUN_FOR_REAL:
            continue
        if not all((readme_folder / w).exists() for w in words[3:] if re.search(r"\.(jpg|png|pt)$", w)):
            continue  # names an image or checkpoint that only a dataset would give
        done = subprocess.run(
            [sys.executable, str(ROOT / "cli.py"), *words[2:]], cwd=readme_folder, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{' '.join(words)}: {done.stderr}"
        ran.append(" ".join(words[2:]))
    assert ran == [
        "caption img.jpg",
        "export --checkpoint data/runs/flickr8k-vgg19-hard/best.pt --out data/models/f8k-hard",
        "caption img.jpg --model data/models/f8k-hard",
    ]
    assert (readme_folder / "data/models/f8k-hard/model.safetensors").exists()


def test_the_python_example_runs(readme_folder):
    (example,) = fenced("python")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", example], cwd=readme_folder, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and (readme_folder / "att.png").stat().st_size > 0
