"""Start, probe and stop the stack's processes by PID (never by name)."""

from __future__ import annotations

import contextvars
import os
import signal
import subprocess
import time
from pathlib import Path

from qis_beam.stack.state import Proc


def start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time since boot), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # a zombie has ended; only its exit status is left
        return None
    return int(fields[19])


#: Set by ``up(tie_to_caller=True)`` (the pytest fixtures): pieces get SIGTERM when the
#: process that started them dies, so a test run killed by a timeout leaves no engines behind.
TIE_TO_CALLER: contextvars.ContextVar[bool] = contextvars.ContextVar("tie", default=False)


def _tied(command: list[str]) -> list[str]:
    # One setpriv call: a second one that changes the user would clear the death signal.
    if command[0] == "setpriv":
        return ["setpriv", "--pdeathsig=TERM", *command[1:]]
    return ["setpriv", "--pdeathsig=TERM", "--", *command]


def spawn(
    role: str,
    command: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    """Start ``command`` in a new session (its own process group), output appended to ``log``."""
    if TIE_TO_CALLER.get():
        command = _tied(command)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    ticks = start_ticks(process.pid) or 0
    return Proc(role, process.pid, process.pid, ticks, str(log), list(command))


def _reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is our child (pytest fixtures), so it is not a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def alive(proc: Proc) -> bool:
    """True while the recorded process itself runs (same PID *and* same start time)."""
    _reap(proc.pid)
    ticks = start_ticks(proc.pid)
    return ticks is not None and (proc.start_ticks == 0 or ticks == proc.start_ticks)


def exit_code(proc: Proc) -> int | None:
    try:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if pid else None


def _signal_group(proc: Proc, sig: int) -> None:
    # Only a group the recorded process still leads: never a group another process formed.
    try:
        if os.getpgid(proc.pid) == proc.pgid:
            os.killpg(proc.pgid, sig)
        else:
            os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def stop(proc: Proc, timeout: float = 20.0, sig: int = signal.SIGTERM) -> bool:
    """Signal the process group (``sig``), SIGKILL what is left after ``timeout``.

    Returns True if the process was running.
    """
    if not alive(proc):
        return False
    _signal_group(proc, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(proc) and not group_members(proc.pgid):
            return True
        time.sleep(0.2)
    if alive(proc) or group_members(proc.pgid):
        try:
            os.killpg(proc.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for _ in range(50):
            _reap(proc.pid)
            if not alive(proc) and not group_members(proc.pgid):
                break
            time.sleep(0.1)
    return True
