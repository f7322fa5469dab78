"""Results: one row per figure, as a table on stdout and as JSON.

Every figure is a ratio against a baseline measured in the same session.
Rounds interleave the two sides (A B A B), each round's ratio is taken
from its own pair, and the row reports the median of those ratios: drift
on a shared machine moves both sides of a pair together and cancels.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec


@dataclass(frozen=True)
class Goal:
    op: Literal[">=", "<="]
    ratio: float

    def met(self, ratio: float) -> bool:
        return ratio >= self.ratio if self.op == ">=" else ratio <= self.ratio

    def __str__(self) -> str:
        return f"{self.op} {self.ratio:.2f}"


@dataclass
class Row:
    key: str
    title: str
    unit: str
    baseline_name: str
    values: list[float]  # the subject, per round
    baselines: list[float]  # its baseline, per round (same order)
    goal: Goal | None = None
    # Share of one core used by the load generator, per load run.
    loadgen_cpu: list[float] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratios(self) -> list[float]:
        return [
            value / baseline for value, baseline in zip(self.values, self.baselines, strict=True)
        ]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def goal_met(self) -> bool | None:
        return None if self.goal is None else self.goal.met(self.ratio)

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "unit": self.unit,
            "baseline_name": self.baseline_name,
            "value_median": statistics.median(self.values),
            "baseline_median": statistics.median(self.baselines),
            "ratio_median": self.ratio,
            "ratios": self.ratios,
            "values": self.values,
            "baselines": self.baselines,
            "goal": str(self.goal) if self.goal else None,
            "goal_met": self.goal_met,
            "loadgen_cpu": self.loadgen_cpu,
            "details": self.details,
        }


def table(rows: list[Row], judged: bool) -> str:
    """A plain-text table; `judged` False (tiny sizes) prints goals but not verdicts."""
    header = (
        "figure",
        "median",
        "baseline",
        "ratio",
        "min-max",
        "goal",
        "met",
        "rounds",
        "loadgen",
    )
    lines = [header]
    for row in rows:
        ratios = row.ratios
        loadgen = f"{max(row.loadgen_cpu):.0%}" if row.loadgen_cpu else "-"
        lines.append(
            (
                row.title,
                f"{statistics.median(row.values):,.1f} {row.unit}",
                f"{statistics.median(row.baselines):,.1f} {row.baseline_name}",
                f"{row.ratio:.2f}",
                f"{min(ratios):.2f}-{max(ratios):.2f}",
                str(row.goal) if row.goal else "-",
                _verdict(row.goal_met) if judged else "n/a",
                str(len(ratios)),
                loadgen,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines
    )


def _verdict(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "NO")


def encode(document: dict[str, Any]) -> bytes:
    return msgspec.json.format(msgspec.json.encode(document), indent=2)
