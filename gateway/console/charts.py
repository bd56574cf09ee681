"""The overview's 30-day chart as inline SVG: issued and spent per day, as bars.

Drawn on the server so the console needs no JavaScript; heights are integer
arithmetic on milli-Ku (no float takes part in any amount)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

WIDTH, HEIGHT, PAD_LEFT, PAD_BOTTOM, PAD_TOP = 720, 220, 56, 28, 12


@dataclass(frozen=True)
class Bar:
    x: int
    y: int
    width: int
    height: int
    kind: str  # "issued" or "spent"
    title: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bars: list[Bar]
    ticks: list[tuple[int, str]]  # (y, label)
    labels: list[tuple[int, str]]  # (x, day)
    baseline: int


def _ku(milli: int) -> str:
    whole, frac = divmod(milli, 1000)
    return f"{whole:,}" if frac == 0 else f"{whole:,}.{frac:03d}".rstrip("0")


def daily_chart(days: list[dict[str, Any]]) -> Chart:
    """`days`: [{"day": "2026-11-25", "issued_milli": int, "spent_milli": int}, ...]."""
    plot_h = HEIGHT - PAD_BOTTOM - PAD_TOP
    top = max([1000, *(d["issued_milli"] for d in days), *(d["spent_milli"] for d in days)])
    slot = (WIDTH - PAD_LEFT) // max(1, len(days))
    bar_w = max(1, (slot - 2) // 2)
    baseline = HEIGHT - PAD_BOTTOM
    bars: list[Bar] = []
    labels: list[tuple[int, str]] = []
    for i, d in enumerate(days):
        x = PAD_LEFT + i * slot
        for j, kind in enumerate(("issued", "spent")):
            milli = max(0, int(d[f"{kind}_milli"]))
            h = milli * plot_h // top
            title = f"{d['day']}: {_ku(milli)} Ku {kind}"
            bars.append(Bar(x + j * bar_w, baseline - h, bar_w, h, kind, title))
        if i % 5 == 0 or i == len(days) - 1:
            labels.append((x, str(d["day"])[5:]))
    ticks = [(baseline - plot_h * k // 4, _ku(top * k // 4)) for k in range(5)]
    return Chart(WIDTH, HEIGHT, bars, ticks, labels, baseline)
