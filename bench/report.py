"""Common output for benchmarks: a table for people and JSON for scripts."""

from __future__ import annotations

import json
import platform
import sys
import time
from typing import Any, Sequence


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import os

    return {"python": platform.python_version(), "cpus": os.cpu_count(), "kernel": platform.release(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def emit(name: str, rows: Sequence[dict[str, Any]], *, as_json: bool, summary: dict[str, Any] | None = None, out=None) -> None:
    """Print ``rows`` as an aligned table (or, with ``as_json``, one JSON document).

    ``summary`` holds the headline figures and ratios against the reference
    measured in the same run.
    """
    out = out or sys.stdout
    doc = {"bench": name, "machine": machine(), "rows": list(rows), "summary": summary or {}}
    if as_json:
        json.dump(doc, out, indent=2, default=_num)
        out.write("\n")
        return
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    out.write(f"== bench {name} ==\n")
    out.write("  ".join(c.rjust(w) for c, w in zip(cols, widths)) + "\n")
    for row in cells:
        out.write("  ".join(v.rjust(w) for v, w in zip(row, widths)) + "\n")
    for k, v in (summary or {}).items():
        out.write(f"{k}: {_fmt(v)}\n")


def _num(x: Any) -> Any:
    try:
        return x.item()
    except AttributeError:
        return str(x)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or 0.01 <= abs(v) < 1e6:
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return f"{v:.3e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)
