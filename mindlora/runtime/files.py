"""Writing a file so that readers see the old one or the whole new one, never half of it.

Every writer in mindlora (checkpoint rank files and trackers, safetensors shards, PEFT adapters,
indexed datasets and their metadata, generation output) goes through :class:`AtomicPath`: write
to a temporary name in the same directory, fsync it, rename it over the final name, fsync the
directory. A failure (or :meth:`AtomicPath.abort`) removes the temporary file and leaves the
final name as it was.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (the directory entry, not only the file's bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicPath:
    """A temporary path (``.tmp``) that becomes ``path`` on :meth:`commit`.

    Use it as ``with atomic_path(path) as tmp:`` (commit when the block ends, abort if it
    raises), or hold it across a longer write (a streaming dataset writer) and call
    :meth:`commit` / :meth:`abort` yourself. Several files that must appear together commit
    one after the other, the one readers look for first (e.g. a tracker, metadata) last.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", suffix=".tmp",
                                        dir=directory)
        os.close(fd)
        umask = os.umask(0)  # mkstemp makes 0600; give the file what open() would have
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)
        self.done: Optional[str] = None  # "committed" / "aborted"

    def commit(self) -> str:
        """fsync the temporary file, rename it to the final path, fsync the directory."""
        if self.done:
            raise RuntimeError(f"{self.path}: already {self.done}")
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp, self.path)
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        self.done = "committed"
        return self.path

    def abort(self) -> None:
        """Remove the temporary file; the final path keeps what it had. Idempotent."""
        if self.done == "committed":
            return
        if os.path.exists(self.tmp):
            os.remove(self.tmp)
        self.done = "aborted"

    def __enter__(self) -> str:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def atomic_path(path: str | os.PathLike) -> AtomicPath:
    """``with atomic_path(p) as tmp: write(tmp)``: ``p`` appears whole, or not at all."""
    return AtomicPath(path)
