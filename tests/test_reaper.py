"""An engine's child processes die with the process that started them, even when that one
is SIGKILLed (as a Ray worker is when its driver dies): vLLM's engine core sits in a
process group of its own, where no group kill reaches it. A pid that now belongs to
another process is never killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from radiag.reaper import _start_time

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.skipif(sys.platform != "linux", reason="the reaper is Linux-only"),
]

PARENT = textwrap.dedent("""
    import subprocess, sys, time
    from radiag.reaper import reap_children_on_exit
    engine = subprocess.Popen(["sleep", "300"], start_new_session=True)  # like EngineCore
    reap_children_on_exit()
    print(engine.pid, flush=True)
    time.sleep(300)
""")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def wait_until_dead(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def test_a_sigkilled_parent_takes_its_engine_process_with_it() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    engine = int(parent.stdout.readline())
    assert alive(engine)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    try:
        assert wait_until_dead(engine, seconds=10)
    finally:
        if alive(engine):
            os.kill(engine, signal.SIGKILL)


def test_a_pid_that_is_another_process_now_is_left_alone() -> None:
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        wrong = str(int(_start_time(bystander.pid)) + 1)  # as if the pid had been reused
        reaper = subprocess.Popen(
            [sys.executable, "-m", "radiag.reaper", str(os.getpid()), f"{bystander.pid}:{wrong}"]
        )
        time.sleep(1.0)  # armed
        reaper.send_signal(signal.SIGTERM)  # what the kernel sends when its parent dies
        assert reaper.wait(timeout=10) == 0
        assert alive(bystander.pid)
    finally:
        bystander.kill()
