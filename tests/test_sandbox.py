"""The sandbox: outcomes of ordinary programs, and hostile ones contained."""

import os
import socket
import sys
import time
import uuid

import pytest

from learnforget.score import sandbox
from learnforget.score.sandbox import run_many, run_program

SYSTEM_PYTHON = "/usr/bin/python3"
NAMESPACES = ("netns", "userns+netns", "prelude")


def _alive_in_group(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is ``pgid``."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            pids.append(int(name))
    return pids


def _group_gone(pgid: int, within_s: float = 3.0) -> bool:
    """SIGKILL is delivered asynchronously: give the killed group a moment to exit."""
    deadline = time.monotonic() + within_s
    while _alive_in_group(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.3)
    yield srv
    srv.close()


def _assert_no_connection(srv):
    with pytest.raises(socket.timeout):
        conn, _ = srv.accept()
        conn.close()


def _os_limits_bind() -> bool:
    """Whether RLIMIT_NPROC binds the child (not plain root, which the kernel exempts)."""
    return run_program("pass").user != "root"


def test_passing_program_output_and_cleanup():
    o = run_program("import os\nprint('hello')\nprint(os.getcwd())\n"
                    "open('f.txt', 'w').write('x')\nprint(open('f.txt').read())\n")
    assert o.status == "passed" and o.passed, o
    hello, cwd, x = o.stdout.splitlines()
    assert (hello, x) == ("hello", "x")
    assert not os.path.exists(cwd), "the working directory must be removed afterwards"
    assert o.exit_code == 0 and o.signal is None and o.reason == ""
    assert o.network in NAMESPACES and o.user
    assert set(o.to_dict()) >= {"status", "exit_code", "signal", "stderr_tail", "wall_s", "network"}


@pytest.mark.parametrize("source, reason", [
    ("raise ValueError('boom')", "ValueError: boom"),
    ("assert 1 == 2", "AssertionError"),
    ("def f(:\n    pass\n", "SyntaxError"),
    ("import sys\nsys.exit(0)\nraise SystemExit", "exit(0)"),
    ("import os\nos._exit(0)", "before finishing"),
])
def test_failures_are_not_passes(source, reason):
    o = run_program(source)
    assert o.status == "failed", o
    assert reason in o.reason
    if "Error" in reason:
        assert reason.split(":")[0] in o.stderr_tail


def test_infinite_loop_is_killed_by_wall_clock_timeout():
    o = run_program("while True:\n    pass\n", timeout_s=1.0)
    assert o.status == "timeout" and not o.passed
    assert "wall-clock" in o.reason
    assert 1.0 <= o.wall_s < 4.0


def test_cpu_limit():
    o = run_program("while True:\n    pass\n", timeout_s=20, cpu_s=1)
    assert o.status == "timeout" and o.signal == "SIGXCPU", o
    assert o.wall_s < 10


def test_huge_allocation_fails_by_address_space_limit():
    o = run_program("x = bytearray(64 * 1024 ** 3)\nprint(len(x))", memory_mb=256)
    assert o.status == "failed" and "MemoryError" in o.reason, o


def test_fork_bomb_is_contained():
    o = run_program("import os, sys\nprint(os.getpgrp(), flush=True)\nwhile True:\n    os.fork()\n",
                    timeout_s=5)
    assert o.status == "failed", o
    pgid = int(o.stdout.split()[0])
    assert _group_gone(pgid)
    assert os.getpid() > 0  # still here


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux limits")
def test_fork_bomb_without_guard_is_bounded_by_rlimit_nproc():
    if not _os_limits_bind():
        pytest.skip("running as root without user namespaces: RLIMIT_NPROC does not bind uid 0")
    bomb = ("import os, time\nn = 0\nfor i in range(200):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n"
            "    n += 1\nprint(os.getpgrp(), n)\n")
    o = run_program(bomb, guard=False, max_processes=8, timeout_s=10)
    assert o.status == "passed", o
    pgid, forks = map(int, o.stdout.split())
    assert forks < 40, f"RLIMIT_NPROC did not stop the fork loop ({forks} forks)"
    assert _group_gone(pgid), "children left behind after the program ended"


def test_writing_outside_the_sandbox_is_refused(tmp_path):
    target = tmp_path / "outside.txt"
    for src in (f"open({str(target)!r}, 'w').write('pwned')",
                f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
                f"import pathlib\npathlib.Path({str(target)!r}).write_text('pwned')",
                f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('pwned')",
                f"import os\nos.chdir({str(tmp_path)!r})\nopen('outside.txt', 'w').write('pwned')"):
        o = run_program(src)
        assert o.status == "failed", (src, o)
        assert not target.exists(), src


def test_deleting_files_outside_is_refused(tmp_path):
    victim = tmp_path / "keep"
    victim.mkdir()
    (victim / "file.txt").write_text("precious")
    for src in (f"import shutil\nshutil.rmtree({str(victim)!r})",
                f"import os\nos.remove({str(victim / 'file.txt')!r})",
                f"import os\nos.rename({str(victim / 'file.txt')!r}, 'stolen.txt')"):
        o = run_program(src)
        assert o.status == "failed", (src, o)
        assert (victim / "file.txt").read_text() == "precious"


def test_parent_environment_is_not_visible(monkeypatch):
    secret = "lf-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("LF_SANDBOX_SECRET", secret)
    src = ("import os\nprint(sorted(os.environ.items()))\n"
           "for p in ('/proc/%d/environ' % os.getppid(), '/proc/%d/cmdline' % os.getppid(), '/proc/1/environ'):\n"
           "    try:\n        print(open(p, 'rb').read())\n    except Exception as exc:\n        print('denied', exc)\n")
    o = run_program(src)
    assert secret not in o.stdout and secret not in o.stderr_tail
    assert "LF_SANDBOX_SECRET" not in o.stdout
    env_keys = {k for k, _ in eval(o.stdout.splitlines()[0])}  # noqa: S307 - our own repr
    assert env_keys <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE"}


def test_network_connection_is_refused(listener):
    port = listener.getsockname()[1]
    for src in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')",
                f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
                f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)"):
        o = run_program(src)
        assert o.status == "failed", (src, o)
    _assert_no_connection(listener)


def test_network_namespace_without_guard(listener):
    probe = run_program("pass")
    if probe.network == "prelude":
        pytest.skip("unshare is not permitted here: the guard is the only network barrier")
    port = listener.getsockname()[1]
    o = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", guard=False)
    assert o.status == "failed", o
    _assert_no_connection(listener)


def test_killing_the_parent_is_contained():
    me = os.getpid()
    for src in ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
                "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
                "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)",
                "import subprocess\nsubprocess.run(['kill', '-9', str(__import__('os').getppid())])",
                "import os\nos.system('kill -9 %d' % os.getppid())"):
        o = run_program(src)
        assert o.status == "failed", (src, o)
    assert os.getpid() == me  # we are alive to check


def test_ctypes_is_refused():
    o = run_program("import ctypes\nctypes.CDLL(None).kill(__import__('os').getppid(), 9)")
    assert o.status == "failed" and "ctypes" in o.reason, o


def test_output_is_capped_and_file_size_limited():
    o = run_program("print('x' * 100000)", output_limit=1000)
    assert o.status == "passed"
    assert len(o.stdout) < 1100 and "more bytes" in o.stdout
    o = run_program("open('big', 'wb').write(b'0' * (3 << 20))", file_size_mb=1)
    assert o.status == "failed", o


def test_missing_interpreter_is_an_error():
    o = run_program("pass", python="/nonexistent/python3")
    assert o.status == "error" and "could not start" in o.reason


def test_run_many_keeps_order():
    programs = ["print(1)", "raise RuntimeError", "print(3)", "while True: pass"]
    outcomes = run_many(programs, workers=3, progress=False, timeout_s=1)
    assert [o.status for o in outcomes] == ["passed", "failed", "passed", "timeout"]
    assert outcomes[2].stdout == "3\n"


@pytest.mark.skipif(not (os.path.exists(SYSTEM_PYTHON) and sandbox.can_drop_privileges(SYSTEM_PYTHON)),
                    reason="needs root and an interpreter that 'nobody' can read")
def test_dropped_privileges_contain_without_guard(tmp_path, monkeypatch, listener):
    """With the guard off, the OS alone (uid nobody, network namespace, limits) holds."""
    secret = "lf-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("LF_SANDBOX_SECRET", secret)
    target = tmp_path / "outside.txt"
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    port = listener.getsockname()[1]
    run = dict(python=SYSTEM_PYTHON, guard=False)
    assert run_program("import os\nassert os.getuid() != 0", **run).status == "passed"
    cases = [
        f"open({str(target)!r}, 'w').write('pwned')",
        f"import os\nos.remove({str(keep)!r})",
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        "import os\nprint(open('/proc/%d/environ' % os.getppid()).read())",
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
    ]
    for src in cases:
        o = run_program(src, **run)
        assert o.status == "failed" and o.user == "nobody", (src, o)
        assert secret not in o.stdout
    assert not target.exists() and keep.read_text() == "precious"
    _assert_no_connection(listener)

