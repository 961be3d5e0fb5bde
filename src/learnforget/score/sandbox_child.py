"""The child side of :mod:`learnforget.score.sandbox`: confine this interpreter, run one program.

:func:`learnforget.score.sandbox.run_program` starts ``python -I`` on this file's path (never
importing it from the package: isolated mode ignores ``PYTHONPATH``), with its settings as
``key=value`` arguments, the run's token on stdin and a result descriptor (``res_fd``). It sets
the resource limits, enters new namespaces or drops to ``nobody`` (:func:`confine`), installs
the reliability guard (:func:`guard`), runs the program as ``__main__`` and reports on the
result descriptor one line per fact: ``network``, ``user``, then ``done TOKEN`` (ran to its
end), ``exception``, ``exit`` or ``setup-error``. The sandbox module's docstring describes the
layers and what they guarantee.

It runs once per program, so it imports little (``os`` and ``sys`` up front, the rest when
needed) and only what an interpreter started with ``-I`` has at hand.
"""

import os
import sys

#: Exit code when this process could not confine itself (the parent's status ``"error"``).
SETUP_ERROR_EXIT = 120


def count_tasks(uid):
    """Tasks (threads) whose real uid is ``uid``: what RLIMIT_NPROC counts."""
    n = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/status" % name, "rb") as fh:
                text = fh.read().decode("ascii", "replace")
        except OSError:
            continue
        real = threads = None
        for line in text.splitlines():
            if line.startswith("Uid:"):
                real = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
        if real == uid:
            n += threads or 1
    return n


def _unshare(libc, flags):
    """Enter new namespaces (``os.unshare``, else libc's); False where not permitted."""
    if not sys.platform.startswith("linux"):
        return False
    if hasattr(os, "unshare"):
        try:
            os.unshare(flags)
            return True
        except OSError:
            return False
    try:
        return libc is not None and libc.unshare(flags) == 0
    except Exception:
        return False


def _limit(name, soft, hard=None):
    """Set a resource limit, soft = hard unless given (the program cannot raise it)."""
    import resource
    res = getattr(resource, name, None)
    if res is not None:
        resource.setrlimit(res, (soft, soft if hard is None else hard))


def confine(cfg):
    """Resource limits, then new namespaces and/or the drop to ``nobody`` (as the sandbox
    module's docstring lays out); returns the (network, user) lines to report."""
    libc = None
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except Exception:
        pass
    linux = sys.platform.startswith("linux")
    CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000

    def unshare(flags):
        return _unshare(libc, flags)

    cpu = int(cfg["cpu_s"])
    _limit("RLIMIT_CPU", cpu, cpu + 1)
    _limit("RLIMIT_AS", int(cfg["memory_bytes"]))
    _limit("RLIMIT_FSIZE", int(cfg["file_size_bytes"]))
    _limit("RLIMIT_CORE", 0)
    margin = int(cfg["max_processes"])
    drop = cfg["drop"] == "1"
    nobody = int(cfg["nobody_uid"]) if cfg.get("nobody_uid") else None
    euid = os.geteuid()

    def nproc_limit(uid, extra):
        if linux:
            n = count_tasks(uid) + margin + extra
            _limit("RLIMIT_NPROC", n)

    network, user = "prelude", "uid %d" % euid
    if drop:
        uid, gid = nobody, int(cfg["nobody_gid"])
        nproc_limit(uid, 1)
        if unshare(CLONE_NEWNET):
            network = "netns"
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise RuntimeError("could not drop privileges")
        if network == "prelude" and unshare(CLONE_NEWUSER | CLONE_NEWNET):
            network = "userns+netns"
        user = cfg.get("nobody_name", "nobody")
    elif euid == 0:
        nproc_limit(0, 0)
        if nobody is not None:
            os.setresuid(nobody, 0, 0)
        if unshare(CLONE_NEWUSER | CLONE_NEWNET):
            network, user = "userns+netns", "root without capabilities (user namespace)"
        else:
            if nobody is not None:
                os.setresuid(0, 0, 0)
            user = "root"
            if unshare(CLONE_NEWNET):
                network = "netns"
    else:
        nproc_limit(euid, 0)
        if unshare(CLONE_NEWUSER | CLONE_NEWNET):
            network = "userns+netns"
    if libc is not None and linux:
        try:
            libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        except Exception:
            pass
    return network, user


def guard(sandbox):
    """Install the reliability guard: an audit hook plus wrappers for what it cannot see.

    Everything the hook and the wrappers call at run time is a closure over values taken here
    (never a global of this module: the program could reach those through ``__main__``)."""
    import posix
    refuse, check_write, check_read = _path_checks(sandbox)
    handlers = _audit_handlers(refuse, check_write, check_read)

    def hook(event, args):
        handler = handlers.get(event)
        if handler is not None:
            handler(args)
        elif event.startswith("socket."):
            refuse("network access (%s)" % event)
        elif event.startswith("ctypes."):
            refuse("ctypes (%s)" % event)

    _wrap_unaudited(posix, refuse, check_write)
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]
    sys.addaudithook(hook)


def _path_checks(sandbox):
    """(refuse, check_write, check_read): refusing an action, and the checks of a path the
    program changes (inside the working directory only) or reads (no other process's /proc)."""
    realpath, join, readlink, getcwd = os.path.realpath, os.path.join, os.readlink, os.getcwd
    fspath, fsdecode = os.fspath, os.fsdecode
    prefix = sandbox.rstrip("/") + "/"
    STREAMS = ("/dev/null", "/dev/stdout", "/dev/stderr", b"/dev/null", b"/dev/stdout", b"/dev/stderr")
    mypid = os.getpid()

    def refuse(what):
        raise PermissionError(13, "sandbox: %s is not allowed" % what)

    def where(path, dir_fd=None):
        p = fsdecode(fspath(path))
        if not p.startswith("/"):
            if dir_fd is None or dir_fd < 0:
                base = getcwd()
            else:
                base = readlink("/proc/self/fd/%d" % dir_fd)
            p = join(base, p)
        return realpath(p)

    def check_write(path, dir_fd=None):
        if path is None or isinstance(path, int) or path in STREAMS:
            return
        try:
            full = where(path, dir_fd)
        except Exception:
            refuse("changing %r (cannot resolve it)" % (path,))
        if full != sandbox and not full.startswith(prefix) and full != "/dev/null":
            refuse("changing %s (outside the sandbox)" % full)

    def check_read(path):
        if path is None or isinstance(path, int):
            return
        try:
            parts = where(path).split("/", 3)
        except Exception:
            return
        if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and int(parts[2]) != mypid:
            refuse("reading /proc/%s (another process)" % parts[2])

    return refuse, check_write, check_read


def _audit_handlers(refuse, check_write, check_read):
    """Audit event -> handler (raises to refuse the event)."""
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    mypid, mypgid = os.getpid(), os.getpgrp()

    def on_open(args):
        path, mode, flags = (tuple(args) + (None, None, 0))[:3]
        writing = bool((flags or 0) & WRITE) or (isinstance(mode, str) and any(c in mode for c in "wax+"))
        if writing:
            check_write(path)
        else:
            check_read(path)

    def first_path(dir_fd_index):
        def handler(args):
            dir_fd = args[dir_fd_index] if dir_fd_index is not None and len(args) > dir_fd_index else None
            check_write(args[0], dir_fd if isinstance(dir_fd, int) else None)
        return handler

    def two_paths(args):
        src_fd = args[2] if len(args) > 2 and isinstance(args[2], int) else None
        dst_fd = args[3] if len(args) > 3 and isinstance(args[3], int) else src_fd
        check_write(args[0], src_fd)
        check_write(args[1], dst_fd)

    def symlink(args):
        check_write(args[1], args[2] if len(args) > 2 and isinstance(args[2], int) else None)

    def kill(args):
        if args[0] not in (0, mypid):
            refuse("signalling process %s" % args[0])

    def killpg(args):
        if args[0] not in (0, mypgid):
            refuse("signalling process group %s" % args[0])

    def no(what):
        def handler(args):
            refuse(what)
        return handler

    handlers = {
        "open": on_open,
        "os.remove": first_path(1), "os.rmdir": first_path(1), "os.mkdir": first_path(2),
        "os.chmod": first_path(2), "os.chown": first_path(3), "os.utime": first_path(3),
        "os.truncate": first_path(None), "os.chflags": first_path(None),
        "os.setxattr": first_path(None), "os.removexattr": first_path(None),
        "shutil.rmtree": first_path(1), "shutil.chown": first_path(None),
        "os.rename": two_paths, "os.link": two_paths, "shutil.move": two_paths,
        "os.symlink": symlink,
        "os.kill": kill, "os.killpg": killpg,
        "os.system": no("os.system"), "os.exec": no("os.exec*"), "os.fork": no("os.fork"),
        "os.forkpty": no("os.forkpty"), "os.posix_spawn": no("os.posix_spawn"),
        "os.spawn": no("os.spawn*"), "subprocess.Popen": no("subprocess"),
        "pty.spawn": no("pty.spawn"), "resource.setrlimit": no("changing resource limits"),
        "resource.prlimit": no("prlimit"),
    }
    return handlers


def _wrap_unaudited(posix, refuse, check_write):
    """Guard what the audit hooks do not see: process creation below subprocess, pidfd signals,
    fifos and device nodes, and os.open relative to a directory descriptor."""
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def refuse_call(what):
        def blocked(*args, **kwargs):
            refuse(what)
        return blocked

    try:
        import _posixsubprocess
        _posixsubprocess.fork_exec = refuse_call("creating processes")
    except ImportError:
        pass
    import signal
    if hasattr(signal, "pidfd_send_signal"):
        signal.pidfd_send_signal = refuse_call("signal.pidfd_send_signal")
    for name in ("mkfifo", "mknod"):
        real = getattr(posix, name, None)
        if real is not None:
            def guarded(path, *args, _real=real, dir_fd=None, **kwargs):
                check_write(path, dir_fd)
                return _real(path, *args, dir_fd=dir_fd, **kwargs)
            setattr(posix, name, guarded)
            setattr(os, name, guarded)
    real_open = posix.open

    def guarded_open(path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is not None and flags & WRITE:
            check_write(path, dir_fd)
        return real_open(path, flags, mode, dir_fd=dir_fd)
    posix.open = os.open = guarded_open


def main():
    argv = sys.argv[1:]
    del sys.argv[1:]
    cfg = dict(a.split("=", 1) for a in argv)
    res_fd = int(cfg["res_fd"])
    write, exit_now = os.write, os._exit

    def report(kind, text=""):
        line = (kind + " " + " ".join(str(text).split())[:500]).rstrip() + "\n"
        try:
            write(res_fd, line.encode("utf-8", "replace"))
        except OSError:
            pass

    token = sys.stdin.readline().strip()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        with open(cfg["program"], encoding="utf-8") as fh:
            source = fh.read()
        sandbox = os.path.realpath(os.getcwd())
        network, user = confine(cfg)
        if cfg["guard"] == "1":
            guard(sandbox)
    except BaseException as exc:
        report("setup-error", "%s: %s" % (type(exc).__name__, exc))
        exit_now(SETUP_ERROR_EXIT)
    report("network", network)
    report("user", user)

    import builtins, linecache
    name = "program.py"
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    namespace = {"__name__": "__main__", "__builtins__": builtins, "__file__": name}

    def flush():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass

    try:
        exec(compile(source, name, "exec"), namespace)
    except SystemExit as exc:
        flush()
        report("exit", exc.code)
        exit_now(exc.code if isinstance(exc.code, int) and exc.code not in (0, SETUP_ERROR_EXIT) else 1)
    except BaseException as exc:
        import traceback
        try:
            traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        except BaseException:
            pass
        flush()
        report("exception", "%s: %s" % (type(exc).__name__, exc))
        exit_now(1)
    flush()
    report("done", token)
    exit_now(0)


if __name__ == "__main__":
    main()
