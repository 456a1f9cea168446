"""The processes of a job's own local Ray die with the job, even when it is SIGKILLed.

A local Ray (``ray.init(address="local")``) fate-shares its GCS and raylet with the driver,
but not the raylet's agents: a SIGKILLed batch job left ``ray::DashboardAgent`` and
``ray::RuntimeEnvAgent`` running. ``start_reaper`` runs a small watcher process beside the
driver; it records every descendant of the driver (pid and start time, so a reused pid is
never hit) while the driver lives, and when the driver is gone -- its end of the watcher's
stdin closes, however it died -- kills those still running, by pid, and removes the Ray
temp dir the job was given. Nothing is looked up by name: only what this job started dies.
Linux only (it reads /proc); elsewhere the watcher does nothing.
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time

_SCAN_S = 0.5    # how often the watcher records the driver's descendants
_GRACE_S = 2.0   # after the driver is gone, how long Ray's own shutdown may take first


def start_reaper(temp_dir: str) -> subprocess.Popen:
    """Start the watcher of this process; keep the returned handle for as long as Ray runs."""
    return subprocess.Popen([sys.executable, "-m", "radixserve.cluster.ray_reaper", str(os.getpid()), temp_dir],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # a Ctrl-C of the job spares it


def start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]  # state, starttime (man 5 proc)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        tree.setdefault(ppid, []).append(int(name))
    return tree


def descendants(root: int) -> list[int]:
    tree, found, todo = _children(), [], [root]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def watch(root: int, temp_dir: str) -> None:
    seen: dict[int, str] = {}  # pid -> start time
    me, root_start = os.getpid(), start_time(root)
    stdin = sys.stdin.fileno()
    while True:
        for pid in descendants(root):
            if pid != me and pid not in seen and (start := start_time(pid)) is not None:
                seen[pid] = start
        ready, _, _ = select.select([stdin], [], [], _SCAN_S)
        if ready and not os.read(stdin, 1024):
            break  # the driver's end closed: it exits or was killed
    while root_start is not None and start_time(root) == root_start:
        time.sleep(0.05)  # a driver that is exiting normally still shuts Ray down itself
    time.sleep(_GRACE_S)
    for pid, start in seen.items():
        if start_time(pid) == start:  # still the process we saw, not a reused pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    shutil.rmtree(temp_dir, ignore_errors=True)


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # finish the cleanup once started
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        watch(int(sys.argv[1]), sys.argv[2])


if __name__ == "__main__":
    main()
