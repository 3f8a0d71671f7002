"""Markdown tables of results: one formatter for the experiment runner, the recipe study and the release."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def format_cell(value, missing: str = "n/a") -> str:
    """Floats with three decimals (NaN, a class absent from labels and predictions, as ``missing``); others as str."""
    if isinstance(value, float):
        return missing if value != value else f"{value:.3f}"
    return str(value)


def markdown_table(
    rows: Sequence[Mapping], columns: Sequence[str] | None = None, header: Sequence[str] | None = None
) -> str:
    """A Markdown table of ``rows`` (dicts): ``columns`` (default the first row's keys) under ``header``."""
    columns = list(columns or (rows[0] if rows else []))
    lines = ["| " + " | ".join(header or columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
