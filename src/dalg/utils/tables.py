"""Rich tables of retrieval scores, printed the same way by training, evaluation and comparisons."""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Console
from rich.table import Table


def print_scores_table(
    results: Mapping[str, object],
    title: str,
    options: Mapping[str, str] | None = None,
    console: Console | None = None,
) -> None:
    """One row per (set, setup): mAP and mP@k in percent, as in the Revisited papers' tables."""
    table = Table(title=title)
    for col in ("set", "setup", "mAP", "mP@1", "mP@5", "mP@10", "options"):
        table.add_column(col, justify="left" if col in ("set", "options") else "right")
    for name, scores in results.items():
        for setup in ("E", "M", "H"):
            mpk = scores.mpk[setup]
            table.add_row(
                name if setup == "E" else "",
                setup,
                f"{scores.map[setup]:.2f}",
                *(f"{mpk[k]:.2f}" for k in (1, 5, 10)),
                (options or {}).get(name, "") if setup == "E" else "",
            )
    (console or Console()).print(table)


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
