"""bench.store.files: the one reader of JSON inputs and the one writer of output files."""
from __future__ import annotations

import errno
import os

import pytest

from bench.store import files
from bench.store.files import StoreError, make_folder, read_json, refuse_linked_folders, write_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """A full disk mid-write (fsync fails): one StoreError line, the old file whole, nothing left behind."""
    target = tmp_path / "baseline.json"
    target.write_text('{"old": true}\n')

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(StoreError, match="cannot write: No space left on device"):
        write_atomic(target, '{"new": true}\n' * 1000)
    assert target.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baseline.json"]


def test_no_write_through_a_linked_folder_inside_the_output_folder(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "runs").symlink_to(elsewhere)
    with pytest.raises(StoreError, match="runs is a symbolic link"):
        write_atomic(out / "runs" / "c-0.json", "{}", root=out)
    with pytest.raises(StoreError, match="runs is a symbolic link"):
        make_folder(out / "runs" / "deeper", root=out)
    assert not list(elsewhere.iterdir())
    refuse_linked_folders(out / "cluster" / "jobs.json", out)  # absent folders are created later: fine
    write_atomic(out / "x.json", "{}", root=out)


def test_the_output_folder_itself_may_be_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "results").symlink_to(tmp_path / "real")
    write_atomic(tmp_path / "results" / "report.md", "ok\n", root=tmp_path / "results")
    assert (tmp_path / "real" / "report.md").read_text() == "ok\n"


def test_the_reader_bounds_what_it_reads_even_when_the_size_says_zero(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    path.write_text("[" + "1, " * 100 + "1]")
    monkeypatch.setattr(files, "READ_CHUNK", 16)
    assert read_json(path, "test file", limit=1 << 10) == [1] * 101
    with pytest.raises(StoreError, match="larger than"):
        read_json(path, "test file", limit=100)


def test_a_json_file_nested_at_the_limit_is_read(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * files.MAX_JSON_DEPTH + "]" * files.MAX_JSON_DEPTH)
    assert files.json_depth(read_json(path, "test file")) == files.MAX_JSON_DEPTH
