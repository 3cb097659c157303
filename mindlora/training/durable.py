"""Durable checkpoint files: fsync, atomic publication of a directory, pruning.

(Content checksums are written and checked by ``mindlora.checkpoint.loading``.)

A save is published in the order write, fsync, rename aside (if needed), rename in, tracker:
``publish`` moves a complete temporary directory to ``iter_XXXXXXX`` and only then rewrites
``latest_checkpointed_iteration.txt``. Rewriting an existing iteration swaps the two directories
atomically (Linux ``renameat2(RENAME_EXCHANGE)``); where the file system cannot, the old one is
renamed aside, and if the tracker named it, the tracker is first pointed at the newest older
checkpoint (or removed when there is none). The tracker therefore never names a missing or
partial directory. Leftovers of saves killed midway (``.iter_*.tmp`` / ``.old``) are removed
after the next publication. ``fault_point`` is the seam the reliability tests use to stall or
kill a rank inside a save.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil

from mindlora.checkpoint import megatron_format as fmt
from mindlora.runtime.files import fsync_dir


class CheckpointWriteError(OSError):
    """A save failed on some rank (disk full, permissions ...); the previous checkpoint is intact."""


def fault_point(stage: str, path: str) -> None:
    """Fault-injection seam for the reliability tests (no-op): called inside a save at ``stage``
    (``rank_file_written`` on every writer, ``renamed_aside`` on rank 0 in the fallback swap)."""


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def iterations(save_dir: str) -> list[int]:
    """Iterations with a published directory (only ever created by renaming a complete one)."""
    out = []
    for entry in os.listdir(save_dir):
        if entry.startswith("iter_") and entry[5:].isdigit():
            out.append(int(entry[5:]))
    return sorted(out)


def _tracked(save_dir: str):
    try:
        return fmt.read_tracker(save_dir)
    except (OSError, ValueError):
        return None


def publish(save_dir: str, tmp_root: str, final: str, iteration: int) -> None:
    """Move a complete ``tmp_root`` to ``final``, then point the tracker at it (rank 0)."""
    fsync_dir(tmp_root)
    aside = None
    if not os.path.exists(final):
        os.rename(tmp_root, final)
    elif _exchange(tmp_root, final):
        aside = tmp_root  # now holds the replaced checkpoint
    else:
        aside = f"{tmp_root[:-len('.tmp')]}.old"
        shutil.rmtree(aside, ignore_errors=True)
        if _tracked(save_dir) == iteration:
            older = [i for i in iterations(save_dir) if i < iteration]
            if older:
                fmt.write_tracker(save_dir, older[-1])
            else:
                os.unlink(os.path.join(save_dir, fmt.TRACKER))
            fsync_dir(save_dir)
        os.rename(final, aside)
        fault_point("renamed_aside", aside)
        os.rename(tmp_root, final)
    fsync_dir(save_dir)
    fmt.write_tracker(save_dir, iteration)
    fsync_dir(save_dir)
    if aside:
        shutil.rmtree(aside, ignore_errors=True)
    for entry in os.listdir(save_dir):  # leftovers of saves killed midway (one job per dir)
        if entry.startswith(".iter_") and entry.endswith((".tmp", ".old")):
            shutil.rmtree(os.path.join(save_dir, entry), ignore_errors=True)


def prune(save_dir: str, keep: int) -> list[int]:
    """Remove all but the newest ``keep`` checkpoints, never the tracked one; returns removed."""
    tracked = _tracked(save_dir)
    removed = []
    for it in iterations(save_dir)[:-keep]:
        if it != tracked:
            shutil.rmtree(os.path.join(save_dir, fmt.iteration_dir_name(it)))
            removed.append(it)
    return removed
