"""Foreground output: every process's lines prefixed with ``replica/role |``, coloured.

Kept apart from the supervisor (as in honcho) so that the manager never knows
about terminals; the detached supervisor simply has no printer.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import click

_COLOURS = ("cyan", "yellow", "green", "magenta", "blue", "bright_cyan", "bright_yellow",
            "bright_green", "bright_magenta", "bright_blue")


class Printer:
    def __init__(self, stream: TextIO | None = None, colour: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.colour = self.stream.isatty() if colour is None else colour
        self.width = 7
        self._colours: dict[str, str] = {}

    def register(self, name: str) -> None:
        self.width = max(self.width, len(name))
        self._colours.setdefault(name, _COLOURS[len(self._colours) % len(_COLOURS)])

    def line(self, name: str, text: str) -> None:
        prefix = f"{name:<{self.width}} |"
        if self.colour:
            prefix = click.style(prefix, fg=self._colours.get(name, "white"))
        self.stream.write(f"{prefix} {text}\n")
        self.stream.flush()

    def event(self, text: str, error: bool = False, warning: bool = False) -> None:
        stamp = time.strftime("%H:%M:%S")
        prefix = f"{'meshctl':<{self.width}} |"
        if self.colour:
            prefix = click.style(prefix, fg="red" if error else "yellow" if warning else "white", bold=True)
        if warning:  # supervisor.log has its level; the terminal says it in words
            text = f"warning: {text}"
        self.stream.write(f"{prefix} {stamp} {text}\n")
        self.stream.flush()
