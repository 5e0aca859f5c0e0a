"""The workdir lock: one training run per workdir at a time.

Process 0 holds an exclusive `fcntl.flock` on `<workdir>/lock` for the run's lifetime. The kernel
releases it when the process ends, however it ends (a SIGKILL too), so no stale lock is left
behind. A run that stops before writing anything into a workdir it created removes the workdir
again. Whether it was taken is shared with every process, so that all processes of a second run
stop at once. flock is only as good as the filesystem's support for it: on a network filesystem
without it, two hosts can still both believe they hold the lock. A bucket workdir (gs://...) has
no flock at all: it is not locked (one logged line), so keep one run per bucket directory.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket

import jax
import numpy as np
from jax.experimental import multihost_utils

LOCK_FILE = "lock"


class WorkdirBusy(RuntimeError):
  """Another run holds the workdir's lock."""


class WorkdirLock:
  """Holds the lock of `workdir` until `release()` (or the process's end)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None
    if "://" in workdir:
      logging.warning("workdir %s is not locked: a bucket path has no flock", workdir)
      return
    self._created = not os.path.exists(workdir)
    holder = ""
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
        os.close(fd)
      else:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
    busy = holder != ""
    if jax.process_count() > 1:
      busy = bool(multihost_utils.broadcast_one_to_all(np.int32(busy)))
    if busy:
      raise WorkdirBusy(f"workdir {workdir} is in use by another training run "
                        f"({holder or 'see process 0'}, lock file {self.path})")

  def release(self) -> None:
    if self._fd is None:
      return
    workdir = os.path.dirname(self.path)
    if self._created and os.listdir(workdir) == [LOCK_FILE]:
      os.unlink(self.path)
      os.rmdir(workdir)
    os.close(self._fd)  # closing the descriptor releases the flock
    self._fd = None
