"""Atomic writes: the final name only ever holds a complete file."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recforge import storage


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "report.json"
    storage.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), storage.atomic_open(target, "w") as handle:
        handle.write('{"v": 2, "half": ')
        raise RuntimeError("crash mid-write")
    assert storage.read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_array_round_trip_is_memory_mappable(tmp_path):
    arr = np.arange(12, dtype=np.int64).reshape(3, 4)
    storage.save_array(tmp_path / "a.npy", arr)
    loaded = storage.load_array(tmp_path / "a.npy")
    assert isinstance(loaded, np.memmap) and np.array_equal(loaded, arr)


def test_written_files_get_normal_permissions(tmp_path):
    storage.write_text(tmp_path / "x.txt", "hi")
    mode = stat.S_IMODE(os.stat(tmp_path / "x.txt").st_mode)
    assert mode & stat.S_IRUSR and mode & stat.S_IRGRP  # not mkstemp's private 0600
    assert storage.sha256_file(tmp_path / "x.txt") == "8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4"



def test_local_dir_round_trip_is_verified_and_atomic(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.bin").write_bytes(b"\x00" * 100)
    storage.put_dir(src, f"file://{tmp_path / 'dst'}", extra={"meta.json": b"{}"})
    marker = storage.read_json(tmp_path / "dst" / storage.COMMIT_MARKER)
    assert sorted(marker["files"]) == ["a.txt", "meta.json", "sub/b.bin"]
    out = storage.get_dir(tmp_path / "dst", tmp_path / "copy")
    assert (out / "sub" / "b.bin").read_bytes() == b"\x00" * 100 and (out / "meta.json").read_text() == "{}"
    (tmp_path / "dst" / "a.txt").write_text("changed")
    with pytest.raises(storage.StorageError, match="a.txt does not match its sha256"):
        storage.get_dir(tmp_path / "dst", tmp_path / "copy2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "dst", "src"]  # no temp left behind


def test_uris_name_local_or_remote_places():
    assert storage.is_remote("s3://bucket/x") and storage.is_remote("S3://b")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp/x")
    assert storage.join("s3://bucket/runs/", "a", "b/") == "s3://bucket/runs/a/b"
    assert str(storage.join("file:///tmp/r", "a")) == "/tmp/r/a"


def test_put_dir_refuses_a_symbolic_link_instead_of_copying_its_target(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the tree")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    (src / "passwd").symlink_to(secret)
    with pytest.raises(storage.StorageError, match=r"passwd is a symbolic link"):
        storage.put_dir(src, tmp_path / "dst")
    (src / "passwd").unlink()
    (src / "certs").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(storage.StorageError, match=r"certs is a symbolic link"):
        storage.put_dir(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("name", ["../outside.txt", "/tmp/outside.txt", "sub/../../outside.txt", "a//b"])
def test_get_dir_refuses_marker_names_outside_the_target(tmp_path, name):
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "outside.txt").write_text("x")
    entry = {"sha256": storage.sha256_file(tmp_path / "outside.txt"), "size": 1}
    storage.write_json(src / storage.COMMIT_MARKER, {"format": 1, "files": {name: entry}})
    with pytest.raises(storage.StorageError, match="does not stay inside the directory"):
        storage.get_dir(src, tmp_path / "out" / "copy")
    assert not (tmp_path / "out").exists()  # refused before anything was created
    assert (tmp_path / "outside.txt").read_text() == "x"


@pytest.mark.parametrize(("content", "why"), [(b'{"files": {"a": "unterminated', "not valid JSON"),
                                               (b"", "empty"), (b'{"a": "\xff"}', "not UTF-8")])
def test_a_damaged_json_file_is_named_in_the_error(tmp_path, content, why):
    path = tmp_path / "manifest.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=why) as err:
        storage.read_json(path)
    assert str(path) in str(err.value)
    storage.write_json(tmp_path / "d" / "x.txt", 1)  # a committed dir whose marker is damaged, named too
    (tmp_path / "d" / storage.COMMIT_MARKER).write_bytes(content)
    with pytest.raises(ValueError, match=why) as err:
        storage.read_marker(tmp_path / "d")
    assert storage.COMMIT_MARKER in str(err.value)


def test_exclusive_lock_refuses_a_second_holder_naming_its_pid_and_frees_on_death(tmp_path: Path) -> None:
    lock = tmp_path / "run" / ".lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from pathlib import Path; from recforge.storage import exclusive_lock\n"
         f"with exclusive_lock(Path({str(lock)!r}), 'busy'):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=rf"^in use by pid {holder.pid}$"), \
                storage.exclusive_lock(lock, "in use by pid {pid}"):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with storage.exclusive_lock(lock, "in use by pid {pid}"):  # the kernel dropped the dead holder's lock
        assert lock.read_text(encoding="ascii").strip() == str(os.getpid())
