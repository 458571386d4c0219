"""Layout of the memzone directory at offset 0 of every instance's memory (schema id 1)."""

import numpy as np

from hotplane.schema.registry import Layout, header_dtype, register

MAGIC = int.from_bytes(b"HOTPLANE", "little")
DIRECTORY_LAYOUT_VERSION = 1
MAX_ZONES = 256
NAME_LEN = 48

ZONE_VALID = 1

DIRECTORY_HEADER = header_dtype(
    [
        ("magic", "<u8"),
        ("layout_version", "<u4"),
        ("max_zones", "<u4"),
        ("generation", "<u8"),  # bumped on every primary start
        ("base", "<u8"),  # address the memory is mapped at in every process
        ("size", "<u8"),
        ("zone_count", "<u4"),  # entries [0, zone_count) are published
        ("hugepage_size", "<u4"),
        ("next_free", "<u8"),  # bump allocator: offset of the first unreserved byte
        ("primary_pid", "<u4"),
        ("_pad", "<u4"),
        ("created_ns", "<u8"),
        ("started_ns", "<u8"),  # when the current generation's primary started
    ]
)

ZONE_ENTRY = np.dtype(
    [
        ("name", f"S{NAME_LEN}"),
        ("offset", "<u8"),
        ("length", "<u8"),
        ("schema_id", "<u4"),
        ("version", "<u4"),
        ("layout_hash", "<u8"),
        ("flags", "<u4"),
        ("align", "<u4"),
        ("generation", "<u8"),  # generation of the primary era that reserved it
    ]
)

DIRECTORY = register(Layout("memzone_directory", 1, 1, header=DIRECTORY_HEADER, element=ZONE_ENTRY, doc="named memzones at offset 0"))
