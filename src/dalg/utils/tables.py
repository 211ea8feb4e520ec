"""The before/after table of a training run (per-set scores: dalg.retrieval.evaluation.print_results)."""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Console
from rich.table import Table


def print_comparison_table(
    before: Mapping[str, Mapping[str, float]],
    after: Mapping[str, Mapping[str, float]],
    title: str,
    console: Console | None = None,
) -> None:
    """mAP E/M/H of two states of one model (e.g. untrained vs trained), side by side."""
    table = Table(title=title)
    for col in ("set", "metric", "untrained", "trained", "change"):
        table.add_column(col, justify="left" if col in ("set", "metric") else "right")
    for name in after:
        for key in ("mAP_E", "mAP_M", "mAP_H"):
            a, b = before.get(name, {}).get(key, float("nan")), after[name][key]
            table.add_row(name, key, f"{a:.2f}", f"{b:.2f}", f"{b - a:+.2f}")
    (console or Console()).print(table)
