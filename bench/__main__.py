"""``python -m bench [SECTION ...]`` (``make bench``): run the benchmarks, print each table as it
is measured, and write them all to bench/RESULTS.md with the command and the machine."""
import datetime
import sys
import tempfile
import time
from pathlib import Path

import click

from pipeline.atomic import atomic_path

from . import beam, features, memory, reading, training
from .common import machine

SECTIONS = ("features", "training", "beam", "memory", "reading")
TITLES = {"features": "1. Feature extraction", "training": "2. Training step", "beam": "3. Beam search",
          "memory": "5. Memory", "reading": "4. Shard reading"}


@click.command()
@click.argument("sections", nargs=-1, type=click.Choice(SECTIONS))
@click.option("--results", type=click.Path(dir_okay=False), default=str(Path(__file__).parent / "RESULTS.md"),
              show_default=True, help="Markdown file the tables are written to.")
def main(sections, results):
    """Measure every stage against its limit (all SECTIONS by default; 'reading' also runs 'memory',
    whose 7000-image features it reads)."""
    sections = set(sections or SECTIONS) | ({"memory"} if "reading" in sections else set())
    started = time.perf_counter()
    out = [f"# Benchmarks", "", f"`{' '.join(['python -m bench', *sys.argv[1:]])}` on {machine()}, "
           f"{datetime.date.today().isoformat()}.", ""]

    def section(name, lines):
        block = [f"## {TITLES[name]}", "", *lines, ""]
        click.echo("\n".join(block))
        out.extend(block)

    with tempfile.TemporaryDirectory(prefix="bench-") as workspace:
        for name, module in (("features", features), ("training", training), ("beam", beam)):
            if name in sections:
                section(name, module.run())
        if "memory" in sections:
            lines, features_7000 = memory.run(Path(workspace))
            if "reading" in sections:
                section("reading", reading.run(features_7000))
            section("memory", lines)
    out.append(f"All of it took {time.perf_counter() - started:.0f} s.")
    with atomic_path(Path(results)) as tmp:
        tmp.write_text("\n".join(out) + "\n", encoding="utf-8")
    click.echo(f"written to {results}")


main()
