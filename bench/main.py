"""``hotplane bench NAME [options]``: run one benchmark module from bench/."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys

import hotplane.bench as pkg

NOT_BENCHES = {"main", "report"}


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name not in NOT_BENCHES and not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: hotplane bench NAME [--json] [options]\n\nbenchmarks: " + ", ".join(names))
        return 0
    name = argv[0]
    if name not in names:
        print(f"hotplane bench: no benchmark {name!r}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    mod = importlib.import_module(f"hotplane.bench.{name}")
    return int(mod.main(argv[1:]) or 0)
