import click
import pytest
from click.testing import CliRunner

import cli


@pytest.mark.parametrize("name", sorted(cli.main.commands))
def test_every_option_is_explained(name):
    command = cli.main.commands[name]
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help and len(param.help) > 10, f"{name} {param.opts}: no help"
    result = CliRunner().invoke(cli.main, [name, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_errors_are_one_line_without_traceback(tmp_path):
    result = CliRunner().invoke(cli.main, ["evaluate", "--checkpoint", str(tmp_path / "none.pt")])
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: {tmp_path / 'none.pt'}: no such checkpoint"
