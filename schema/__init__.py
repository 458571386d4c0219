"""Versioned layouts of everything placed in shared memory, and their migrations.

Importing this package registers every layout this build understands.
"""

import importlib

from hotplane.schema.registry import Layout, SchemaError, check, get, latest, register  # noqa: F401

# Each layout module registers itself on import; a module not written yet is simply absent.
for _mod in ("memzone", "ring", "counters", "session", "port", "traffic", "nat", "upgrade"):
    try:
        importlib.import_module(f"hotplane.schema.{_mod}")
    except ModuleNotFoundError as _e:
        if _e.name != f"hotplane.schema.{_mod}":
            raise
