"""The schema registry: ids, versions, layout hashes, refusal messages, migrations."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import hotplane.schema  # noqa: F401  (registers every product layout)
from hotplane.schema import registry
from hotplane.schema.registry import Layout, SchemaError


def test_hash_depends_on_layout_not_identity():
    a = Layout("t_hash", 1100, 1, element=np.dtype([("x", "<u4"), ("y", "<u4")]))
    b = Layout("t_hash", 1100, 1, element=np.dtype([("x", "<u4"), ("y", "<u4")]))
    c = Layout("t_hash", 1100, 1, element=np.dtype([("y", "<u4"), ("x", "<u4")]))
    d = Layout("t_hash", 1100, 1, element=np.dtype([("x", "<u4"), ("y", "<u8")]))
    assert a.layout_hash == b.layout_hash
    assert len({a.layout_hash, c.layout_hash, d.layout_hash}) == 3


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["<u1", "<u2", "<u4", "<u8", "<i8", "S8"]), min_size=1, max_size=6), st.integers(0, 5))
def test_any_field_change_changes_hash(types, which):
    fields = [(f"f{i}", t) for i, t in enumerate(types)]
    base = Layout("t_prop", 1101, 1, element=np.dtype(fields))
    i = which % len(fields)
    changed = list(fields)
    changed[i] = (fields[i][0], "<u2" if fields[i][1] != "<u2" else "<u4")
    assert Layout("t_prop", 1101, 1, element=np.dtype(changed)).layout_hash != base.layout_hash
    renamed = list(fields)
    renamed[i] = ("other", fields[i][1])
    assert Layout("t_prop", 1101, 1, element=np.dtype(renamed)).layout_hash != base.layout_hash


def test_register_conflict_refused():
    registry.register(Layout("t_conf", 1102, 1, element=np.dtype("<u4")))
    registry.register(Layout("t_conf", 1102, 1, element=np.dtype("<u4")))  # same again is fine
    with pytest.raises(SchemaError, match="registered twice"):
        registry.register(Layout("t_conf", 1102, 1, element=np.dtype("<u8")))


def test_check_messages_say_found_and_expected():
    lay = registry.register(Layout("t_chk", 1103, 1, element=np.dtype("<u4")))
    assert registry.check(1103, 1, lay.layout_hash) is lay
    with pytest.raises(SchemaError, match="unknown schema id 99999"):
        registry.check(99999, 1, 0)
    with pytest.raises(SchemaError, match=r"version 7 is not known to this build, which understands versions \[1\]"):
        registry.check(1103, 7, 0)
    with pytest.raises(SchemaError, match="found 0x0000000000000005, this build expects"):
        registry.check(1103, 1, 5)


def test_stamp_and_verify_header():
    lay = registry.register(Layout("t_hdr", 1104, 1, header=registry.header_dtype([("n", "<u8")])))
    buf = np.zeros(lay.zone_size(), np.uint8)
    hdr = buf[: lay.header.itemsize].view(lay.header)
    with pytest.raises(SchemaError, match="never initialised"):
        registry.verify(hdr, lay)
    registry.stamp(hdr, lay)
    assert registry.verify(hdr, lay) is lay
    assert registry.verify(hdr, "t_hdr") is lay
    hdr[0]["layout_hash"] ^= 1
    with pytest.raises(SchemaError, match="layout hash mismatch"):
        registry.verify(hdr, lay)


def test_migrations_registry_and_compatibility():
    v1 = registry.register(Layout("t_mig", 1105, 1, element=np.dtype("<u4")))
    v2 = registry.register(Layout("t_mig", 1105, 2, element=np.dtype([("a", "<u4"), ("b", "<u4")])))
    assert registry.compatibility(1105, 2, v2.layout_hash) == "compatible"
    assert registry.compatibility(1105, 1, v1.layout_hash).startswith("refused: no migration")

    @registry.register_migration(1105, 1, 2)
    def up(src, dst):
        dst["a"] = src
        dst["b"] = 0

    assert registry.compatibility(1105, 1, v1.layout_hash) == "needs migration"
    src = np.arange(4, dtype="<u4")
    dst = np.zeros(4, v2.element)
    registry.migration(1105, 1, 2)(src, dst)
    assert list(dst["a"]) == [0, 1, 2, 3]
    with pytest.raises(SchemaError, match="no migration registered"):
        registry.migration(1105, 2, 3)
    assert registry.compatibility(1105, 1, 123).startswith("refused: ")


def test_product_layouts_are_cache_line_aligned_and_unique():
    lays = [l for l in registry.all_layouts() if l.schema_id < 1000]
    assert lays, "no product layouts registered"
    assert len({(l.schema_id, l.version) for l in lays}) == len(lays)
    for l in lays:
        assert l.header_size % 64 == 0
        if l.header is not None:
            assert l.header.names[:3] == ("schema_id", "version", "layout_hash"), l.name
