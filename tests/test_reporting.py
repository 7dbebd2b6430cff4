"""reporting.atomic_write: the one way files are replaced (results, reports, snapshots, exports)."""

import os

import pytest

from skipnet_jax import reporting


def test_atomic_write_replaces_the_file_in_one_step(tmp_path):
    path = str(tmp_path / "out.json")
    reporting.write_json(path, {"a": float("nan"), "b": 1})
    assert reporting.read_json(path) == {"a": None, "b": 1}
    with reporting.atomic_write(path, "wb") as f:
        f.write(b"{}")
    assert reporting.read_json(path) == {} and os.listdir(tmp_path) == ["out.json"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "out.json")
    reporting.write_json(path, {"kept": True})
    with pytest.raises(ValueError), reporting.atomic_write(path) as f:
        f.write("{trunc")
        raise ValueError("disk full")
    assert reporting.read_json(path) == {"kept": True} and os.listdir(tmp_path) == ["out.json"]
