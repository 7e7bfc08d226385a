"""Ratio tables, which every section of the benchmark reports (:mod:`.report`, :mod:`.compiled`,
:mod:`.activation`): the ratios between variants and their Markdown lines."""

from __future__ import annotations

import statistics


def table_ratios(rows, tables: dict[str, dict], fields: dict[str, str]) -> dict[str, dict]:
    """Ratios between the variants of result tables: {key: {label, value, target, met, ...}}.

    ``rows``: (key, label, section, numerator, denominator, target or None); ``tables[section]`` is the table
    ({variant: figures}) a row reads and ``fields[section]`` the figure it compares. A time ratio (a figure with
    an ``_all`` list beside it) is the median over rounds of the ratio of the two variants' times in the same
    round (both measured within seconds of each other, so a change of machine load between rounds cancels
    out); ``ratio_of_medians`` is given beside it. Rows whose variants were not run are left out.
    """
    out: dict[str, dict] = {}
    for key, label, section, num, den, target in rows:
        table, field = tables.get(section) or {}, fields[section]
        a, b = table.get(num, {}).get(field), table.get(den, {}).get(field)
        if a is None or b is None:
            continue
        entry = {"label": label, "value": a / b, "target": target}
        if field + "_all" in table[num]:
            pairs = zip(table[num][field + "_all"], table[den][field + "_all"])
            entry.update(value=statistics.median(x / y for x, y in pairs), ratio_of_medians=a / b)
        entry["met"] = None if target is None else entry["value"] <= target
        out[key] = entry
    return out


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def ratio_table(entries: dict[str, dict]) -> list[str]:
    """Markdown lines of a ratio table (see :func:`table_ratios`)."""
    lines = ["| ratio | value | target |", "|---|---:|---|"]
    for r in entries.values():
        target = "" if r["target"] is None else f"<= {r['target']:.2f} ({'met' if r['met'] else 'NOT met'})"
        lines.append(f"| {r['label']} | {r['value']:.3f} | {target} |")
    return lines
