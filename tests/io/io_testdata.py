"""Paths and small helpers shared by the io tests (a plain module: conftest names clash across dirs)."""

from pathlib import Path

DATA = Path(__file__).parent / "data"
REAL = DATA / "real"


def by_type(layers):
    """{layer_type: (data, meta)} for a reader result with at most one layer per type."""
    out = {}
    for data, meta, kind in layers:
        assert kind not in out, f"two {kind} layers"
        out[kind] = (data, meta)
    return out
