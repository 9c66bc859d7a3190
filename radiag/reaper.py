"""Child processes that must not outlive the process that started them.

vLLM runs its engine core in a child process with a process group of its own. When the
Ray worker holding the engine is SIGKILLed (its driver was killed and Ray tore the job
down, or a user killed it), nothing tells that child: it keeps its memory and its CPUs
until someone finds it. A reaper is a tiny process the kernel signals when its parent
dies (Linux `PR_SET_PDEATHSIG`); it then kills the children it was given, each only if
it is still the same process (its start time is checked, so a reused pid is left alone).

Linux only: elsewhere `reap_children_on_exit` starts nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading

import psutil

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies, held back (blocked, and
    so pending) until the reaper has its handler: Python takes a while to start."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _start_time(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat: the process's start time in clock ticks since boot."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[19]


def reap_children_on_exit() -> None:
    """Have this process's child processes (now, recursively) killed when it dies.

    Call it once the children are started (after the engine is up). The reaper is started
    from a thread that lives as long as the process: Linux sends the death signal when the
    *thread* that forked it ends, and a task's thread may end long before the process.
    """
    if sys.platform != "linux":
        return
    children = psutil.Process().children(recursive=True)
    targets = [f"{c.pid}:{_start_time(c.pid)}" for c in children if c.is_running()]
    if not targets:
        return
    started = threading.Event()

    def keep_reaper() -> None:
        subprocess.Popen(
            [sys.executable, "-m", "radiag.reaper", str(os.getpid()), *targets],
            preexec_fn=_die_with_parent,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C of the terminal is for the engine, not for it
        )
        started.set()
        threading.Event().wait()  # this thread ends only with the process

    threading.Thread(target=keep_reaper, name="radiag-reaper", daemon=True).start()
    started.wait()


def main(parent: int, targets: list[str]) -> None:
    """The reaper: wait for the death signal, then kill every target ("pid:start time")
    that is still the process it was."""

    def reap(*_: object) -> None:
        for target in targets:
            pid, start = target.split(":")
            try:
                if _start_time(int(pid)) == start:
                    os.kill(int(pid), signal.SIGKILL)
            except (OSError, IndexError):  # gone already
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, reap)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # a pending one runs now
    if os.getppid() != parent:  # the parent died before the death signal was armed
        reap()
    while True:
        signal.pause()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
