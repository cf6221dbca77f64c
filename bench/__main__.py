"""``python -m bench [SECTION ...]`` (``make bench``): run the benchmarks, print each table as it
is measured, and write them all to bench/RESULTS.md with the command and the machine."""

import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

from pipeline.io.atomic import atomic_path
from pipeline.io.memory import configure_allocator

from . import beam, features, memory, reading, training
from .common import machine

SECTIONS = ("features", "training", "beam", "memory", "reading")
TITLES = {
    "features": "1. Feature extraction",
    "training": "2. Training step",
    "beam": "3. Beam search",
    "memory": "5. Memory",
    "reading": "4. Shard reading",
}


def previous_sections(path: Path) -> dict[str, str]:
    """The sections of an earlier RESULTS.md, by title, to keep those not measured in this run."""
    if not path.exists():
        return {}
    blocks = path.read_text(encoding="utf-8").split("\n## ")[1:]
    return {block.splitlines()[0]: "## " + block.rstrip("\n") + "\n" for block in blocks}


@click.command()
@click.argument("sections", nargs=-1, type=click.Choice(SECTIONS))
@click.option(
    "--results",
    type=click.Path(dir_okay=False),
    default=str(Path(__file__).parent / "RESULTS.md"),
    show_default=True,
    help="Markdown file the tables are written to (sections not run are kept).",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Torch device of the features, training and beam sections (cuda: their GPU figures, kept in "
    "sections of their own; memory and reading run on the CPU only).",
)
def main(sections, results, device):
    """Measure every stage against its limit (all SECTIONS by default; 'reading' also runs 'memory',
    whose 7000-image features it reads)."""
    sections = set(sections or SECTIONS) | ({"memory"} if "reading" in sections else set())
    on_gpu = device != "cpu"
    if on_gpu and not torch.cuda.is_available():
        raise click.UsageError(f"--device {device}: this machine has no CUDA GPU that torch can use")
    if on_gpu:
        sections &= {"features", "training", "beam"}
        if not sections:
            raise click.UsageError(f"--device {device}: memory and reading run on the CPU only; drop --device")
    results = Path(results)
    if "features" in sections and sections != {"features"}:  # in a process of its own: see configure_allocator
        subprocess.run(
            [sys.executable, "-m", "bench", "features", "--results", os.path.relpath(results), "--device", device],
            check=True,
        )
        sections.discard("features")
    # as `cli.py features` or `cli.py train` sets itself up (the port's run too)
    configure_allocator(huge_pages=sections == {"features"})
    kept = previous_sections(results)
    provenance = f"`{' '.join(['python -m bench', *sys.argv[1:]])}` on {machine()}, {datetime.date.today().isoformat()}"

    def section(name, lines, started):
        """Print a measured section and write RESULTS.md with it (so a later section's failure
        loses none that are done)."""
        title = TITLES[name] + (", CUDA" if on_gpu else "")
        block = "\n".join([f"## {title}", "", f"{provenance}; {time.perf_counter() - started:.0f} s.", "", *lines, ""])
        click.echo(block)
        kept[title] = block
        order = sorted(kept, key=lambda title: title.split(".")[0])
        with atomic_path(results) as tmp:
            tmp.write_text("# Benchmarks\n\n" + "\n".join(kept[title] for title in order), encoding="utf-8")

    with tempfile.TemporaryDirectory(prefix="bench-") as workspace:
        for name, module in (("features", features), ("training", training), ("beam", beam)):
            if name in sections:
                started = time.perf_counter()
                section(name, module.run(device), started)
        if "memory" in sections:
            started = time.perf_counter()
            lines, features_7000 = memory.run(Path(workspace))
            section("memory", lines, started)
            if "reading" in sections:
                started = time.perf_counter()
                section("reading", reading.run(features_7000), started)
    click.echo(f"written to {results}")


main()
