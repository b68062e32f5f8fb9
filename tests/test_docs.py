"""The README tells the truth about the commands that exist."""

from __future__ import annotations

import re

from click.testing import CliRunner

from meshctl.cli import main
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_first_paragraph_describes_the_sidecar_as_present():
    first = README.split("\n\n")[1]
    assert "sidecar" in first and "soon" not in first


def test_every_command_is_in_the_commands_table():
    listed = set(re.findall(r"^\| `meshctl ([a-z-]+)", README, flags=re.M))
    commands = {name for name, cmd in main.commands.items() if not cmd.hidden}
    assert commands <= listed, f"not in the README's command table: {sorted(commands - listed)}"
    assert CliRunner().invoke(main, ["--help"]).exit_code == 0
