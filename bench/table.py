"""One row per figure: what we measured, what it is compared with, and the ratio."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """``ours`` and ``reference`` in ``unit``; ``ratio`` = ours / reference (None when meaningless)."""

    figure: str
    ours: float
    unit: str
    reference: float | None = None
    reference_label: str = ""
    target: str = ""

    @property
    def ratio(self) -> float | None:
        if self.reference in (None, 0):
            return None
        return self.ours / self.reference  # type: ignore[operator]


def _num(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    text = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return f"{text} {unit}".strip()


def render(rows: list[Row]) -> str:
    """A Markdown table (the README shows it as printed)."""
    lines = ["| figure | ours | reference | ratio | target |", "|---|---|---|---|---|"]
    for row in rows:
        reference = _num(row.reference, row.unit)
        if row.reference_label:
            reference = f"{reference} ({row.reference_label})" if row.reference is not None else row.reference_label
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}"
        lines.append(f"| {row.figure} | {_num(row.ours, row.unit)} | {reference} | {ratio} | {row.target} |")
    return "\n".join(lines)
