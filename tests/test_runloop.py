"""The one event-loop runner: an ImportError raised inside a run is the program's error, not a reason to run again."""

from __future__ import annotations

import asyncio

import pytest

from pods.runloop import run


def test_import_error_inside_a_run_runs_it_once():
    calls = []

    async def main() -> None:
        calls.append(asyncio.get_running_loop())
        raise ImportError("a missing optional module of the program")

    with pytest.raises(ImportError, match="optional module"):
        run(main())
    assert len(calls) == 1  # the old fallback ran the whole program a second time under asyncio


def test_result_is_returned_from_uvloop():
    async def main() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run(main()).startswith("uvloop")
