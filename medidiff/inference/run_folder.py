"""What makes a folder run safe to repeat and to share: one writer at a time, and resumption keyed on what the
inputs hold, not on their names.

- :func:`folder_lock`: an exclusive ``flock`` on ``<output>/.medidiff-lock`` for the whole run. Two runs into one
  folder used to both finish, the second silently replacing the first's results; now the second stops at once.
  The kernel drops the lock when its process dies (``kill -9`` included), so nothing stale is left to clear.
- :func:`input_digest`: SHA-256 of a case's source files (every file of a DICOM series folder, with its name), kept
  in the provenance; a case whose input was replaced under the same name is done again, not skipped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from medidiff.errors import MedidiffError

LOCK_NAME = ".medidiff-lock"
_CHUNK = 1 << 20


@contextlib.contextmanager
def folder_lock(output: Path) -> Iterator[None]:
    """Hold the output folder for this run; another run holding it is a :class:`MedidiffError`. The lock file is
    removed when the run ends."""
    path = output / LOCK_NAME
    handle = _locked(path, output)
    try:
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held, so no other run can have taken it in between
        handle.close()


def _locked(path: Path, output: Path):
    while True:
        try:
            handle = open(path, "a+", encoding="utf-8")
        except OSError as err:
            raise MedidiffError(f"cannot create its lock file ({err.strerror})", output) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.close()
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise MedidiffError("another medidiff run is writing into this folder; wait for it to finish or "
                                    "choose another --output", output) from None
            raise
        if _same_file(handle, path):
            return handle
        handle.close()  # a run that just ended removed the file we locked: take the new one


def _same_file(handle, path: Path) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def input_digest(sources: Mapping[str, Path]) -> dict[str, str]:
    """``{role: sha256}`` of each source: a file's bytes, or a folder's files (names and bytes, in name order)."""
    return {role: _digest(Path(path)) for role, path in sources.items()}


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(_CHUNK), b""):
                digest.update(block)
    return digest.hexdigest()
