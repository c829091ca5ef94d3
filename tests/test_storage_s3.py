"""Object storage against a real S3-compatible server (SeaweedFS): verified round trips, commit
markers that hide half-uploaded directories, and retries that ride out a server outage."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _seaweed import SeaweedServer

from recforge import storage


def _tree(root: Path, files: int = 3, size: int = 5000) -> Path:
    root.mkdir(parents=True)
    rng = hashlib.sha256(root.name.encode())
    for i in range(files):
        target = root / ("sub" if i % 2 else "") / f"f{i}.bin"
        target.parent.mkdir(exist_ok=True)
        rng.update(i.to_bytes(4, "little"))
        target.write_bytes(rng.digest() * (size // 32))
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != storage.COMMIT_MARKER}


def test_dir_round_trip_is_verified(s3_prefix: str, tmp_path: Path) -> None:
    src = _tree(tmp_path / "bundle")
    uri = f"{s3_prefix}/bundle"
    assert not storage.exists(uri)
    storage.put_dir(src, uri, extra={"note.txt": b"hello"})
    assert storage.exists(uri) and storage.is_remote(uri) and not storage.is_remote(src)
    assert storage.list_dir(uri) == sorted([storage.COMMIT_MARKER, "f0.bin", "f2.bin", "note.txt", "sub"])
    out = storage.get_dir(uri, tmp_path / "copy")
    assert _snapshot(out) == {**_snapshot(src), "note.txt": b"hello"}
    with pytest.raises(FileExistsError):
        storage.get_dir(uri, tmp_path / "copy")
    # Replacing a directory drops files the new one does not have.
    (src / "f0.bin").unlink()
    storage.put_dir(src, uri)
    assert _snapshot(storage.get_dir(uri, tmp_path / "copy2")) == _snapshot(src)


def test_corrupted_object_is_refused_on_download(s3_prefix: str, tmp_path: Path) -> None:
    uri = f"{s3_prefix}/bundle"
    storage.put_dir(_tree(tmp_path / "bundle"), uri)
    storage.put_bytes(f"{uri}/sub/f1.bin", b"bit rot")
    with pytest.raises(storage.StorageError, match="f1.bin does not match its sha256"):
        storage.get_dir(uri, tmp_path / "copy")
    assert not (tmp_path / "copy").exists() and not list(tmp_path.glob(".tmp-*"))


def test_directory_without_commit_marker_is_invisible(s3_prefix: str, tmp_path: Path) -> None:
    # What an upload interrupted before its marker leaves behind: objects, no marker.
    src = _tree(tmp_path / "bundle")
    uri = f"{s3_prefix}/half"
    for rel in _snapshot(src):
        storage.put_file(src / rel, f"{uri}/{rel}")
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError, match="no committed directory"):
        storage.get_dir(uri, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    storage.put_dir(src, uri)  # finishing the upload makes it appear, complete
    assert _snapshot(storage.get_dir(uri, tmp_path / "copy")) == _snapshot(src)


def test_files_bytes_and_conditional_create(s3_prefix: str, tmp_path: Path) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(70_000))
    storage.put_file(src, f"{s3_prefix}/a.bin")
    assert storage.get_file(f"{s3_prefix}/a.bin", tmp_path / "b.bin").read_bytes() == src.read_bytes()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.get_bytes(f"{s3_prefix}/missing")
    # Exactly one creator wins; a retried create of our own bytes still counts as ours.
    assert storage.create_if_absent(f"{s3_prefix}/claim", b"token-1")
    assert not storage.create_if_absent(f"{s3_prefix}/claim", b"token-2")
    assert storage.create_if_absent(f"{s3_prefix}/claim", b"token-1")
    assert storage.get_bytes(f"{s3_prefix}/claim") == b"token-1"
    assert storage.honours_conditional_create(s3_prefix)  # the registry refuses stores that do not


def test_unreachable_store_fails_with_the_uri_after_bounded_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    from _seaweed import free_ports

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("RECFORGE_STORAGE_RETRIES", "3")
    with pytest.raises(storage.StorageError, match=r"s3://nowhere/x\.bin failed after 3 attempts"):
        storage.get_bytes("s3://nowhere/x.bin")


_UPLOAD = """
import sys
from pathlib import Path
from recforge import storage
storage.put_dir(Path(sys.argv[1]), sys.argv[2])
"""


@pytest.mark.slow
def test_server_killed_mid_upload_then_retry_completes(seaweed_factory: Callable[[], SeaweedServer], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    server = seaweed_factory()
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    src = _tree(tmp_path / "bundle", files=100, size=4096)
    uri = "s3://recforge/runs/killed"
    env = {**os.environ, "RECFORGE_STORAGE_RETRIES": "2"}
    upload = subprocess.Popen([sys.executable, "-c", _UPLOAD, str(src), uri], env=env, stderr=subprocess.PIPE,
                              text=True)
    deadline = time.monotonic() + 60
    while not storage.list_dir(uri) and time.monotonic() < deadline:  # some objects are in: crash the server
        time.sleep(0.02)
    server.kill()
    _, stderr = upload.communicate(timeout=60)
    assert upload.returncode != 0 and f"{uri}/" in stderr and "failed after 2 attempts" in stderr, stderr

    server.start()  # same data directory: what was uploaded before the crash is still there
    assert storage.list_dir(uri), "the crash came after some objects were stored"
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError):
        storage.get_dir(uri, tmp_path / "copy")

    # An upload that starts while the server is down rides out the outage with backoff.
    server.kill()
    monkeypatch.setenv("RECFORGE_STORAGE_RETRIES", "12")
    errors: list[BaseException] = []

    def retry_upload() -> None:
        try:
            storage.put_dir(src, uri)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    worker = threading.Thread(target=retry_upload)
    worker.start()
    time.sleep(1.0)
    server.start()
    worker.join(120)
    assert not worker.is_alive() and not errors, errors
    assert _snapshot(storage.get_dir(uri, tmp_path / "copy")) == _snapshot(src)
