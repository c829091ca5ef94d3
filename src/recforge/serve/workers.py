"""What each worker process of one `recforge serve --workers N` is doing, for the other workers to read.

uvicorn's supervisor restarts a worker that died, and the workers share one listening socket: a worker
takes connections as soon as its server loop starts. Two questions need the state of the others:

- may a (re)started worker start accepting before its models are loaded? Only when no other worker is
  accepting (the server's first start, or every worker down): then someone must answer /healthz and a
  /readyz 503. While another worker serves, the new one loads first and accepts after, so no request
  reaches a worker without models;
- is the server ready? /readyz is answered by whichever worker took the connection, so it says ready only
  when every worker that accepts connections has its models (a worker that is down or still loading
  takes no connections, so it cannot fail a request; it is listed in the admin detail).

Each worker keeps one small JSON file, `<pid>.json`, in a directory the supervisor made for this server
(removed when it exits), rewritten whole (write and rename) whenever its state changes. A file whose pid
is gone, is a zombie, or is not a child of this worker's own parent (a reused pid) is stale: it is ignored
and removed, so a SIGKILLed worker, which leaves its file behind, stops counting at once.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uvicorn.supervisors.multiprocess import Process

# The directory the supervisor made for the workers' state files.
STATE_DIR_ENV = "RECFORGE_WORKER_STATE_DIR"


@dataclass(frozen=True)
class WorkerState:
    pid: int
    accepting: bool  # its server takes connections (it finished startup)
    models: dict[str, Any] | None  # the versions it serves; None until its models loaded


def _sibling(pid: int, parent: int) -> bool:
    """Whether `pid` is a live (not zombie) child of `parent`; without /proc, whether it exists at all."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no procfs here: existence is all we can tell
    except (OSError, ValueError):
        return False
    return state not in ("Z", "X") and int(ppid) == parent


class WorkerBoard:
    """One worker's view of the state directory: publish its own state, read the live workers'."""

    def __init__(self, root: Path, pid: int | None = None, parent: int | None = None) -> None:
        self.root = root
        self.pid = os.getpid() if pid is None else pid
        self.parent = os.getppid() if parent is None else parent

    def publish(self, accepting: bool, models: dict[str, Any] | None) -> None:
        body = json.dumps({"pid": self.pid, "accepting": accepting, "models": models})
        tmp = self.root / f".{self.pid}.tmp"
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, self.root / f"{self.pid}.json")

    def withdraw(self) -> None:
        with contextlib.suppress(OSError):
            (self.root / f"{self.pid}.json").unlink()

    def states(self) -> list[WorkerState]:
        """The live workers' states, this one's included, by pid; stale files are removed."""
        found = []
        try:
            paths = sorted(self.root.glob("*.json"))
        except OSError:  # the supervisor is removing the directory on its way out
            return []
        for path in paths:
            try:
                pid = int(path.stem)
            except ValueError:
                continue  # not a state file
            if pid != self.pid and not _sibling(pid, self.parent):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # removed or being replaced this instant; the next read sees it
            found.append(WorkerState(pid, bool(data.get("accepting")), data.get("models")))
        return found

    def others_accepting(self) -> list[int]:
        return [s.pid for s in self.states() if s.accepting and s.pid != self.pid]


class WorkerProcess(Process):
    """uvicorn's worker handle, except that the supervisor drops its copy of the worker's end of the health-ping
    pipe once the worker has started (the worker has its own).

    Holding that copy, the supervisor never sees the pipe close when a worker dies: a ping sent just before a
    SIGKILL waits out the whole `worker_healthcheck_timeout_s` (60 s) before the death is noticed and a
    replacement started. Without it, the ping ends at once (end of file) and the worker is replaced within the
    supervisor's 0.5 s round. (A module-level class: the spawned worker unpickles its handle by name.)
    """

    def start(self) -> None:
        super().start()
        self.child_conn.close()
