"""Workdir files on a local disk or in a bucket.

A workdir is a local path or a URL (gs://bucket/run on TPU VMs, s3://...,
any fsspec protocol). Orbax writes checkpoints to either by itself; the small
files t5lab writes beside them (config.json, tokenizer.model, metrics) go
through here. gs:// needs `gcsfs` (`pip install -e ".[gcs]"`).
"""
from __future__ import annotations

import os
import posixpath
import shutil
import tempfile


class StorageError(Exception):
    """The workdir's file system cannot be reached (missing package, bad URL)."""


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def absolute(path: str) -> str:
    """A local path made absolute; a URL unchanged (os.path would mangle it)."""
    return path if is_remote(path) else os.path.abspath(path.removeprefix("file://"))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def _fs(path: str):
    import fsspec
    try:
        return fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as e:  # fsspec: "Install gcsfs to access Google Storage"
        raise StorageError(f"{path}: {e}") from None


def check(path: str) -> None:
    """Raises StorageError naming `path` when it cannot be a workdir: its file
    system is unusable, it is a file, or it (or the folder it would be made in)
    is not writable."""
    if is_remote(path):
        _fs(path)
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise StorageError(f"{path}: is a file, not a folder")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "."
    if not os.path.isdir(probe):
        raise StorageError(f"{path}: {probe} is a file, not a folder")
    try:  # a real write: access() says yes to root on a read-only mount
        fd, tmp = tempfile.mkstemp(prefix=".t5lab-write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise StorageError(f"{path}: {probe} is not writable ({e.strerror or e})") from None


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    fs, p = _fs(path)
    return fs.exists(p)


def isdir(path: str) -> bool:
    if not is_remote(path):
        return os.path.isdir(path)
    fs, p = _fs(path)
    return fs.isdir(p)


def makedirs(path: str) -> None:
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)
        return
    fs, p = _fs(path)
    fs.makedirs(p, exist_ok=True)  # buckets have no directories; memory:// and others do


def read_text(path: str) -> str:
    if not is_remote(path):
        with open(path) as f:
            return f.read()
    fs, p = _fs(path)
    with fs.open(p, "r") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    if not is_remote(path):
        with open(path, "w") as f:
            f.write(text)
        return
    fs, p = _fs(path)
    with fs.open(p, "w") as f:
        f.write(text)


def listdir(path: str) -> list[str]:
    """Base names of the entries of a directory."""
    if not is_remote(path):
        return os.listdir(path)
    fs, p = _fs(path)
    return [posixpath.basename(e.rstrip("/")) for e in fs.ls(p, detail=False)]


def download(path: str, local: str) -> None:
    if not is_remote(path):
        shutil.copyfile(path, local)
        return
    fs, p = _fs(path)
    fs.get_file(p, local)


def upload(local: str, path: str) -> None:
    """Copies a local file to `path`, replacing it (object stores cannot append)."""
    if not is_remote(path):
        shutil.copyfile(local, path)
        return
    fs, p = _fs(path)
    fs.put_file(local, p)


def walk(path: str) -> list[tuple[str, int]]:
    """(path relative to `path`, size) of every file below a directory, sorted."""
    if not is_remote(path):
        out = []
        for d, _, files in os.walk(path):
            for f in files:
                full = os.path.join(d, f)
                out.append((os.path.relpath(full, path), os.path.getsize(full)))
        return sorted(out)
    fs, p = _fs(path)
    found = fs.find(p, detail=True)
    return sorted((posixpath.relpath(k, p), int(v.get("size") or 0)) for k, v in found.items()
                  if v.get("type") != "directory")


def open_binary(path: str):
    if not is_remote(path):
        return open(path, "rb")
    fs, p = _fs(path)
    return fs.open(p, "rb")


def rename(src: str, dst: str) -> None:
    if not is_remote(src):
        os.replace(src, dst)
        return
    fs, p = _fs(src)
    fs.mv(p, _fs(dst)[1], recursive=True)
