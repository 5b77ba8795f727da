"""Markdown and CSV tables of metric results, with ↑/↓ per column and the best value marked."""

from __future__ import annotations

import csv
import io
import math


def _decimals(metric: str) -> int:
    return 2 if metric.startswith("psnr") else 4


def format_value(metric: str, value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{_decimals(metric)}f}"


def best_rows(results: dict[str, dict[str, float]], lower_better: dict[str, bool]) -> dict[str, set[str]]:
    """metric → the row names holding its best value (ties share), compared at the printed precision."""
    best: dict[str, set[str]] = {}
    for metric, low in lower_better.items():
        values = {
            row: round(vals[metric], _decimals(metric))
            for row, vals in results.items()
            if vals.get(metric) is not None and math.isfinite(vals[metric])
        }
        if not values:
            best[metric] = set()
            continue
        target = min(values.values()) if low else max(values.values())
        best[metric] = {row for row, v in values.items() if v == target}
    return best


def markdown_table(
    results: dict[str, dict[str, float]], lower_better: dict[str, bool], first_header: str = "method"
) -> str:
    """One row per method, one column per metric (header `name ↑/↓`); the best value per column in bold
    when there are at least two rows.

    Args:
        results: row name → {metric: mean}.
        lower_better: metric → True when lower is better; fixes the column order.
    """
    metrics = list(lower_better)
    best = best_rows(results, lower_better) if len(results) > 1 else {m: set() for m in metrics}
    header = [first_header] + [f"{m} {'↓' if lower_better[m] else '↑'}" for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(metrics)) + "|"]
    for row, vals in results.items():
        cells = [row]
        for m in metrics:
            text = format_value(m, vals.get(m))
            cells.append(f"**{text}**" if row in best[m] else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict], columns: list[str]) -> str:
    """CSV with a header; missing or non-finite values are left empty."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        out = []
        for c in columns:
            v = row.get(c)
            if isinstance(v, float):
                out.append(repr(v) if math.isfinite(v) else "")
            else:
                out.append("" if v is None else str(v))
        writer.writerow(out)
    return buf.getvalue()
