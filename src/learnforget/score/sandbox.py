"""Run untrusted Python programs (model-written code) in a sandboxed child process.

Never ``exec`` model output in our own process: :func:`run_program` starts one fresh
``python -I`` interpreter per program and runs the program there, under these layers:

**Process boundary and OS limits (the real guarantees).**

* A throwaway working directory (removed afterwards), a minimal environment (``PATH``,
  ``HOME``/``TMPDIR`` pointing at the working directory, ``LANG``; nothing of ours), stdin on
  ``/dev/null``, and no file descriptors but stdout, stderr and one result channel.
* Its own session and process group (``start_new_session``): after the program ends, or at
  the wall-clock timeout, the whole group is killed with ``SIGKILL``.
* Resource limits set by the child (:mod:`learnforget.score.sandbox_child`) before any program
  code runs, soft = hard so that the program cannot raise them: ``RLIMIT_CPU`` (``SIGXCPU``, then ``SIGKILL``),
  ``RLIMIT_AS`` (allocations fail with ``MemoryError``), ``RLIMIT_FSIZE`` (also caps what
  stdout/stderr can write), ``RLIMIT_CORE = 0`` and ``RLIMIT_NPROC`` = the tasks that the
  charged user already has + ``max_processes``.
* Linux namespaces and identity, chosen by the child (reported as ``Outcome.network`` and
  ``Outcome.user``):

  - run as root, with an interpreter whose standard library "others" can read: a new network
    namespace (``unshare(CLONE_NEWNET)``), then the child drops to ``nobody`` (groups, gid,
    uid). The working directory is chowned to ``nobody``; everything else of ours (files,
    processes, /proc/<pid>/environ) is then out of reach by plain Unix permissions.
  - run as root, with an interpreter that ``nobody`` cannot read (e.g. under ``/root``): the
    real uid becomes ``nobody`` (so that ``RLIMIT_NPROC`` binds: uid 0 is exempt from it), then
    ``unshare(CLONE_NEWUSER | CLONE_NEWNET)``: a user namespace in which uid 0 is unmapped, so
    the child keeps file access as the owner of root's files but loses every capability
    (cannot raise limits, change uid back, mount, or read other processes' /proc entries) and
    has no network. It can still write files root owns and signal root's processes: there
    the reliability guard below is what stops it.
  - not root: ``unshare(CLONE_NEWUSER | CLONE_NEWNET)`` where the kernel allows unprivileged
    user namespaces.
  - where ``unshare`` is not permitted at all (or not Linux), ``network == "prelude"``: the
    guard's socket blocking is then the only network barrier.

**Reliability guard (a prelude in the child; defence in depth, not a security boundary).**
Before the program runs, the child installs a PEP 578 audit hook (it cannot be removed)
that refuses: opening files for writing, and removing/renaming/chmod-ing/linking paths,
outside the working directory (``/dev/null``, ``/dev/stdout``, ``/dev/stderr`` excepted);
reading other processes' ``/proc`` entries; ``os.system``, ``os.exec*``,
``os.fork``/``forkpty``, ``os.posix_spawn``, ``os.spawn*``, ``subprocess.Popen``; signalling
any process but itself (``os.kill``/``os.killpg``); every ``socket.*`` event (creating a socket, connect, DNS); every
``ctypes.*`` event; ``resource.setrlimit``/``prlimit``. It also wraps the few things that the
hooks do not see (``_posixsubprocess.fork_exec``, ``signal.pidfd_send_signal``,
``os.mkfifo``/``os.mknod``, ``os.open`` with ``dir_fd``). A deliberately adversarial program
that finds a way around an audit hook (they are documented as bypassable) still meets the OS
layer above.

**Scoring.** ``passed`` means the program ran to its end without an exception: the child
then writes a per-run random token (sent on stdin, which is then closed) to the result
channel. ``sys.exit()``/``exit(0)``/``os._exit(0)`` part-way therefore counts as ``failed``.
A program written to cheat (find the token in the child's memory) could still forge a pass;
the sandbox protects the machine, and the score only against accidents.

Not covered: there is no PID or mount namespace, so a process that left our process group
and session (possible only around the guard, which refuses ``fork``) would outlive the group
kill; the file system is protected by permissions (when the child runs as ``nobody``) and the
guard, not by a read-only view.

Each program costs one interpreter start (about 15 ms plus the program); there is no
separate supervisor process. :func:`run_many` runs several at once from a thread pool (the
children are separate processes; ``preexec_fn`` is not used, so spawning from threads is safe).
"""

from __future__ import annotations

import functools
import json
import math
import os
import pwd
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from learnforget.score import sandbox_child

#: The values of :attr:`Outcome.status`.
STATUSES = ("passed", "failed", "timeout", "error")

_UNPRIVILEGED_USER = "nobody"

#: The program the child interpreter runs (by path: ``python -I`` ignores PYTHONPATH): it
#: confines itself, installs the guard, runs the program and reports (see its docstring).
CHILD = Path(sandbox_child.__file__)


@dataclass(frozen=True)
class Outcome:
    """What happened to one program.

    ``status`` is one of :data:`STATUSES`: ``passed`` (ran to its end without an exception),
    ``failed`` (an exception, a nonzero exit, an early exit or a fatal signal), ``timeout``
    (wall-clock timeout, or the CPU limit) or ``error`` (the sandbox itself could not run it).
    """

    status: str
    reason: str = ""
    exit_code: int | None = None
    signal: str | None = None
    wall_s: float = 0.0
    stdout: str = ""
    stderr_tail: str = ""
    network: str = ""
    user: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


def _interpreter_dirs(python: str) -> tuple[str, ...]:
    code = ("import json, os, sysconfig; p = sysconfig.get_paths(); "
            "d = [p['stdlib'], p['platstdlib'], p['purelib'], p['platlib'], "
            "os.path.join(p['platstdlib'], 'lib-dynload')]; "
            "print(json.dumps([x for x in d if os.path.isdir(x)]))")
    out = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        return ()
    return tuple(json.loads(out.stdout))


def _others_can_read(path: str) -> bool:
    """Whether a user who is neither owner nor group member can list ``path`` (and reach it)."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(1, len(parts) + 1):
        current = os.sep.join(parts[:i]) or os.sep
        try:
            mode = os.stat(current).st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IROTH)


@functools.lru_cache(maxsize=None)
def _drop_target(python: str) -> tuple[int, int, str] | None:
    """(uid, gid, name) to drop to, when we are root and ``python`` works for that user."""
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        return None
    try:
        entry = pwd.getpwnam(_UNPRIVILEGED_USER)
    except KeyError:
        return None
    try:
        dirs = _interpreter_dirs(python)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if not dirs or not all(_others_can_read(d) for d in dirs):
        return None
    if not _others_can_read(os.path.dirname(os.path.realpath(python))):
        return None
    return entry.pw_uid, entry.pw_gid, entry.pw_name


def can_drop_privileges(python: str | None = None) -> bool:
    """Whether :func:`run_program` will run ``python`` as ``nobody`` (root, readable stdlib)."""
    return _drop_target(python or sys.executable) is not None


def _nobody_uid() -> int | None:
    try:
        return pwd.getpwnam(_UNPRIVILEGED_USER).pw_uid
    except KeyError:
        return None


def _wait_for_exit(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait until ``proc`` exits, without reaping it (its pid, and so its process group id,
    stay reserved until :meth:`Popen.wait`). Returns False on timeout."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            return bool(poller.poll(max(0, int(math.ceil(timeout_s * 1000)))))
        finally:
            os.close(pidfd)
    if not hasattr(os, "waitid"):  # not Linux: wait() reaps, a small pid-reuse race remains
        try:
            proc.wait(timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_head(path: str, limit: int) -> str:
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
        size = os.fstat(fh.fileno()).st_size
    if len(data) > limit:
        return data[:limit].decode("utf-8", "replace") + f"\n[... {size - limit} more bytes]"
    return data.decode("utf-8", "replace")


def _read_tail(path: str, limit: int) -> str:
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        fh.seek(max(0, size - limit))
        data = fh.read(limit)
    text = data.decode("utf-8", "replace")
    return (f"[... {size - limit} bytes before]\n" + text) if size > limit else text


def _remove_tree(path: str) -> None:
    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    # The program may have left directories without permissions (we are not root here).
    for root, dirs, _files in os.walk(path):
        for d in dirs:
            try:
                os.chmod(os.path.join(root, d), 0o700)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def run_program(
    source: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    cpu_s: int | None = None,
    file_size_mb: int = 16,
    max_processes: int = 16,
    output_limit: int = 8192,
    drop_privileges: bool | None = None,
    guard: bool = True,
    python: str | None = None,
    tmp_dir: str | None = None,
) -> Outcome:
    """Run ``source`` as ``__main__`` in a sandboxed child interpreter; never raises for what
    the program does.

    ``timeout_s`` is wall-clock (the process group is killed), ``cpu_s`` the CPU limit
    (default ``ceil(timeout_s) + 1``), ``memory_mb`` the address-space limit,
    ``file_size_mb`` the largest file the program may write (stdout and stderr included),
    ``max_processes`` the extra tasks (processes or threads) it may start. ``output_limit``
    bytes of stdout (head) and stderr (tail) are kept. ``drop_privileges``: None = drop to
    ``nobody`` when root and the interpreter allows it, False = never, True = required (else
    status ``error``). ``guard=False`` leaves out the reliability guard (only to test the OS
    limits on their own).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if memory_mb <= 0 or file_size_mb <= 0 or max_processes < 0 or output_limit <= 0:
        raise ValueError("memory_mb, file_size_mb and output_limit must be positive, max_processes >= 0")
    python = python or sys.executable
    cpu = int(cpu_s) if cpu_s is not None else int(math.ceil(timeout_s)) + 1
    target = _drop_target(python) if drop_privileges is not False else None
    if drop_privileges and target is None:
        return Outcome(status="error", reason=f"cannot drop privileges for {python} "
                                              "(not root, no 'nobody', or its files are not world-readable)")
    start = time.monotonic()
    token = secrets.token_hex(16)
    limits = {"cpu_s": cpu, "memory_bytes": int(memory_mb) << 20, "file_size_bytes": int(file_size_mb) << 20,
              "max_processes": int(max_processes), "guard": int(bool(guard))}
    base = None
    try:
        base = tempfile.mkdtemp(prefix="lf-sandbox-", dir=tmp_dir)
        run = _run_child(base, source, python, limits, target, token, timeout_s, output_limit, start)
    except _CouldNotStart as exc:
        return Outcome(status="error", reason=f"could not start {python}: {exc}", wall_s=time.monotonic() - start)
    except OSError as exc:
        return Outcome(status="error", reason=f"sandbox failure: {exc}", wall_s=time.monotonic() - start)
    finally:
        if base is not None:
            _remove_tree(base)
    return _outcome(run, token, timeout_s, cpu)


class _CouldNotStart(Exception):
    """The child interpreter did not start (its OSError's message)."""


@dataclass(frozen=True)
class _Finished:
    """What one child left behind."""

    finished: bool
    """False: killed at the wall-clock timeout."""
    returncode: int
    wall: float
    lines: list[str]
    """The result channel: the child's ``kind text`` lines."""
    stdout: str
    stderr: str


def _run_child(base: str, source: str, python: str, limits: dict, target: tuple | None, token: str,
               timeout_s: float, output_limit: int, start: float) -> _Finished:
    """Run the program in a child with ``base`` as its private folder (the working directory
    ``work``, the program, its output files); kill what is left of its process group; read
    what it wrote."""
    work = os.path.join(base, "work")
    os.mkdir(work, 0o700)
    program = os.path.join(base, "program.py")
    with open(program, "w", encoding="utf-8") as fh:
        fh.write(source)
    if target is not None:
        os.chown(work, target[0], target[1])
    paths = {name: os.path.join(base, name) for name in ("stdout", "stderr", "result")}
    fds = [os.open(paths[n], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
           for n in ("stdout", "stderr", "result")]
    try:
        proc = _start_child(python, program, work, fds, limits, target, token)
    finally:
        for fd in fds:
            os.close(fd)
    try:
        finished = _wait_for_exit(proc, timeout_s)
    finally:
        # The leader is not reaped yet, so its pid still names our group: kill what is
        # left of it (children the program started), then reap.
        _kill_group(proc.pid)
        returncode = proc.wait()
    wall = time.monotonic() - start
    return _Finished(finished, returncode, wall, _read_head(paths["result"], 1 << 16).splitlines(),
                     _read_head(paths["stdout"], output_limit), _read_tail(paths["stderr"], output_limit))


def _start_child(python: str, program: str, work: str, fds: list[int], limits: dict, target: tuple | None,
                 token: str) -> subprocess.Popen:
    """Start :data:`CHILD` in its own session, settings as ``key=value`` arguments, the token on
    stdin (then closed), stdout/stderr/result on ``fds``, a minimal environment."""
    out_fd, err_fd, res_fd = fds
    nobody = _nobody_uid()
    cfg = {"program": program, "res_fd": res_fd, **limits, "drop": int(target is not None),
           "nobody_uid": "" if nobody is None else nobody}
    if target is not None:
        cfg.update(nobody_uid=target[0], nobody_gid=target[1], nobody_name=target[2])
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
    argv = [python, "-I", str(CHILD)] + [f"{k}={v}" for k, v in cfg.items()]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out_fd, stderr=err_fd,
                                pass_fds=(res_fd,), cwd=work, env=env, start_new_session=True)
    except OSError as exc:
        raise _CouldNotStart(str(exc)) from exc
    try:
        proc.stdin.write((token + "\n").encode())
        proc.stdin.close()
    except OSError:
        pass
    return proc


def _outcome(run: _Finished, token: str, timeout_s: float, cpu: int) -> Outcome:
    """The status and reason of a finished child, from its exit and its result lines."""
    marks: dict[str, str] = {}
    for line in run.lines:
        kind, _, text = line.partition(" ")
        marks.setdefault(kind, text)  # the child's own lines come first
    returncode = run.returncode
    exit_code = returncode if returncode >= 0 else None
    sig = _signal_name(-returncode) if returncode < 0 else None
    common = dict(exit_code=exit_code, signal=sig, wall_s=round(run.wall, 4), stdout=run.stdout,
                  stderr_tail=run.stderr, network=marks.get("network", ""), user=marks.get("user", ""))
    if not run.finished:
        return Outcome(status="timeout", reason=f"wall-clock timeout after {timeout_s:g} s", **common)
    if "setup-error" in marks:
        return Outcome(status="error", reason=f"sandbox setup failed: {marks['setup-error']}", **common)
    if returncode == -signal.SIGXCPU:
        return Outcome(status="timeout", reason=f"CPU time limit of {cpu} s exceeded", **common)
    if returncode == 0 and secrets.compare_digest(marks.get("done", ""), token):
        return Outcome(status="passed", **common)
    if sig is not None:
        reason = f"killed by {sig}"
    elif "exception" in marks:
        reason = marks["exception"]
    elif "exit" in marks:
        reason = f"program called exit({marks['exit']}) before finishing"
    elif not marks:
        reason = f"interpreter exited with code {returncode} before the sandbox started"
    else:
        reason = f"exited with code {returncode} before finishing"
    return Outcome(status="failed", reason=reason, **common)


def run_many(
    programs: Sequence[str] | Iterable[str],
    *,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "sandbox",
    **limits,
) -> list[Outcome]:
    """Run several programs with :func:`run_program` (each its own child process) from a
    thread pool of ``workers`` (default: the CPU count); outcomes in input order."""
    from tqdm.auto import tqdm

    programs = list(programs)
    workers = max(1, int(workers or os.cpu_count() or 1))
    outcomes: list[Outcome | None] = [None] * len(programs)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        futures = {pool.submit(run_program, src, **limits): i for i, src in enumerate(programs)}
        with tqdm(total=len(programs), desc=desc, unit="prog", disable=not progress, file=sys.stderr) as bar:
            for future in as_completed(futures):
                outcomes[futures[future]] = future.result()
                bar.update()
    return outcomes  # type: ignore[return-value]


__all__ = ["STATUSES", "Outcome", "run_program", "run_many", "can_drop_privileges"]
