"""Printing of the benchmarks' tables (plain text, aligned columns)."""

from __future__ import annotations

import sys


def table(title: str, header: list[str], rows: list[list]) -> None:
    cols = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cols[1:]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    sys.stdout.flush()
