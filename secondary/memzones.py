"""``hotplane memzones [EAL] -- [--json]``: attach as a secondary and list the memzones."""

from __future__ import annotations

import argparse
import json
import sys

from hotplane.shared.eal import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, parse_or_exit
from hotplane.shared.instance import InstanceError, describe, eal_init


def main(argv: list[str]) -> int:
    opts = parse_or_exit(argv, prog="hotplane memzones", role="secondary")
    if opts.vdevs:
        print(f"hotplane memzones: --vdev {opts.vdevs[0]} is not supported: ports are the primary's --inside/--outside", file=sys.stderr)
        return EXIT_USAGE
    ap = argparse.ArgumentParser(prog="hotplane memzones ... --")
    ap.add_argument("--json", action="store_true")
    try:
        app = ap.parse_args(opts.app_args)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    try:
        inst = eal_init(opts)
    except InstanceError as e:
        print(f"hotplane memzones: {e}", file=sys.stderr)
        return EXIT_FAILURE
    info = describe(inst)
    inst.close()
    if app.json:
        print(json.dumps(info, indent=1))
        return EXIT_OK
    print(f"instance {info['prefix']} generation {info['generation']}: {info['size'] >> 20} MiB at {info['base']} "
          f"({'hugepages ' + str(info['hugepage_size'] >> 10) + ' KiB' if info['hugepages'] else '4 KiB pages'}) {info['memory_file']}")
    print(f"{'name':40s} {'offset':>12s} {'length':>12s} {'schema':>6s} {'ver':>4s}  layout hash")
    for z in info["zones"]:
        print(f"{z['name']:40s} {z['offset']:12d} {z['length']:12d} {z['schema_id']:6d} {z['version']:4d}  {z['layout_hash']}")
    return EXIT_OK
