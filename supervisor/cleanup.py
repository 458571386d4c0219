"""``hotplane cleanup --file-prefix P``: remove a stopped instance's memory and runtime files."""

from __future__ import annotations

import argparse
import json
import sys

from hotplane.shared.eal import EXIT_FAILURE, EXIT_OK, PREFIX_RE
from hotplane.shared.instance import InstanceError, cleanup


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="hotplane cleanup", description=__doc__)
    ap.add_argument("--file-prefix", "-p", default="hotplane")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if not PREFIX_RE.match(a.file_prefix):
        print(f"hotplane cleanup: bad --file-prefix {a.file_prefix!r}", file=sys.stderr)
        return 2
    try:
        removed = cleanup(a.file_prefix)
    except InstanceError as e:
        print(f"hotplane cleanup: {e}", file=sys.stderr)
        return EXIT_FAILURE
    if a.json:
        print(json.dumps({"prefix": a.file_prefix, "removed": removed}))
    elif removed:
        print(f"removed {len(removed)} path(s) of instance {a.file_prefix!r}:")
        for r in removed:
            print(f"  {r}")
    else:
        print(f"nothing to remove for instance {a.file_prefix!r}")
    return EXIT_OK
