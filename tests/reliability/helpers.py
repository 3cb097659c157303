"""Run ``mindlora.train``'s entry point in a forked process, as a user's launcher would.

Forking from the test process reuses its imports (a fresh interpreter costs seconds); the child
gets a world of one, its own stdout/stderr files, and exits with ``main``'s return code, so a
test sees exactly what a user sees: the exit status and the printed lines.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import socket
import sys
import time
import traceback
from typing import Callable, Optional

import torch


def flags(base: str, data: str, iters: int, *extra: str) -> list[str]:
    return ["--load", base, "--data-path", data, "--micro-batch-size", "2",
            "--global-batch-size", "4", "--seq-length", "32", "--train-iters", str(iters),
            "--lr", "1e-2", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.2",
            "--log-interval", "1", *extra]


def train(base: str, data: str, iters: int, *extra: str):
    """Train in this (spawned) process; returns mindlora's TrainResult."""
    from mindlora.training.args import parse_args
    from mindlora.training.loop import train as run

    return run(parse_args(flags(base, data, iters, *extra)), log=lambda *_: None)


def digest(root: str) -> str:
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            h.update(os.path.relpath(os.path.join(dirpath, name), root).encode())
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MainRun:
    """``mindlora.train.main(argv)`` in a forked child; ``wait`` gives (rc, stdout, stderr)."""

    def __init__(self, argv: list[str], workdir: str,
                 setup: Optional[Callable[[], None]] = None) -> None:
        from mindlora.train import main

        self.out, self.err = os.path.join(workdir, "stdout.txt"), os.path.join(workdir, "err.txt")
        for path in (self.out, self.err):
            open(path, "w").close()
        self.done = False
        self.pid = os.fork()
        if self.pid:
            return
        rc = 99
        try:
            sys.stdout = open(self.out, "w", buffering=1)
            sys.stderr = open(self.err, "w", buffering=1)
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                              WORLD_SIZE="1", LOCAL_RANK="0")
            torch.set_num_threads(1)
            if setup is not None:
                setup()
            rc = main(argv)
        except BaseException:
            traceback.print_exc(file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)

    def stdout(self) -> str:
        with open(self.out) as f:
            return f.read()

    def wait_for(self, pattern: str, timeout_s: float = 240) -> None:
        """Block until the child's stdout matches ``pattern`` (it must still be running)."""
        deadline = time.monotonic() + timeout_s
        while not re.search(pattern, self.stdout()):
            assert time.monotonic() < deadline, f"{pattern!r} never printed:\n{self.stdout()}"
            assert os.waitpid(self.pid, os.WNOHANG) == (0, 0), "the run ended early"
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the child if it still runs (a failing test must not leave it behind)."""
        if not self.done and os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        self.done = True

    def signal(self, signum: int = signal.SIGTERM) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout_s: float = 300) -> tuple[int, str, str]:
        deadline = time.monotonic() + timeout_s
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.done = True
                break
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise TimeoutError(f"mindlora.train did not finish within {timeout_s} s")
            time.sleep(0.05)
        with open(self.err) as f:
            return os.waitstatus_to_exitcode(status), self.stdout(), f.read()


def run_main(argv: list[str], workdir: str, setup=None) -> tuple[int, str, str]:
    os.makedirs(workdir, exist_ok=True)
    return MainRun(argv, workdir, setup).wait()


def one_error_line(rc: int, err: str) -> str:
    """Assert the entry point failed with exactly one error line and no traceback; return it."""
    lines = [ln for ln in err.splitlines() if ln.startswith("mindlora.train: error:")]
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


def full_disk_on(pattern: str):
    """Make rank-file writes whose path contains ``pattern`` fail like a full disk: torch.save
    writes some bytes, then the write raises ENOSPC (mindlora's own write path runs as usual)."""
    from mindlora.checkpoint import megatron_format as fmt

    real_write, real_save = fmt.write_rank_file, torch.save

    def failing_save(obj, f, *a, **kw):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(path, payload):
        if pattern not in path:
            return real_write(path, payload)
        torch.save = failing_save
        try:
            return real_write(path, payload)
        finally:
            torch.save = real_save

    fmt.write_rank_file = write
    return lambda: setattr(fmt, "write_rank_file", real_write)
