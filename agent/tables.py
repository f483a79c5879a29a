"""Plain-text tables for terminals: what a person reads after `fleet ls` or a conversion."""

from __future__ import annotations


def format_table(headers: list[str], rows: list[list[object]], align: str | None = None) -> str:
    """Columns sized to their content; `align` is one char per column, 'l' or 'r' (default: left)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" * len(headers)

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])
