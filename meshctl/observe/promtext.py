"""Reading the Prometheus text exposition format (what sidecars and services expose).

Only what ``meshctl stats`` needs: samples as (name, labels, value); no
metadata, no timestamps. Lines it does not understand are skipped rather
than failing a whole scrape.
"""

from __future__ import annotations

import math
import re

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Labels = tuple[tuple[str, str], ...]


def parse(text: str) -> list[tuple[str, Labels, float]]:
    out = []
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        if math.isnan(value):
            continue
        labels = tuple(sorted((k, v.replace('\\"', '"').replace("\\\\", "\\"))
                              for k, v in _LABEL.findall(m.group(3) or "")))
        out.append((m.group(1), labels, value))
    return out
