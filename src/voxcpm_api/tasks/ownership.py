"""One engine owner per output directory, elected with an OS file lock.

With `--workers N` every uvicorn worker runs the app, but only the process holding
`<output_dir>/.engine.lock` loads the model and runs tasks; the others accept requests, write
tasks to the shared SQLite store and read results from it. The kernel drops the lock when its
holder dies (even by `kill -9`), so a waiting worker takes over and re-queues the interrupted
tasks. See docs/adr/0002-one-engine-owner.md.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class EngineLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
