"""Run untrusted Python (generated MBPP programs) in an isolated, limited process.

OS isolation (bubblewrap, ``bwrap``), for every program:

- a read-only view of the whole file system (``--ro-bind / /``, ``/tmp`` included); the only writable
  places are a fresh temporary directory (working directory, ``$HOME``, ``$TMPDIR``; removed
  afterwards) and a private ``/dev``;
- new network, PID, IPC, UTS, user and cgroup namespaces (``--unshare-all``): no network (only a
  private loopback), the evaluator and every other host process invisible and unreachable; all
  capabilities dropped; ``--die-with-parent`` and ``--new-session``. When the program ends or is
  killed, the PID namespace goes with it, so no process it started (``fork`` + ``setsid`` included)
  survives the run;
- ``setrlimit`` limits (address space, CPU seconds, file size, no core dumps, number of processes), a
  stripped environment and a wall-clock timeout that kills the whole process group.

Without a working ``bwrap`` (see :func:`isolation_error`), :func:`run_program` refuses to run anything
unless called with ``unsafe_exec=True``; then only the rlimits, the timeout and the prelude below apply.

The verdict. A small runner (:data:`RUNNER`, not the candidate's code) reads a random secret from an
inherited pipe, closes that pipe, compiles the program and the tests, runs the program in a fresh
``__main__`` module, turns tracing and profiling off, runs each test statement as its own code object
(tracing off again after each) and only then writes the secret to stdout and exits. A pass needs
exit status 0 and the secret at the end of stdout. The secret is never in a file, the command line or
the environment, and its pipe is gone before the program starts, so reading the own source,
``/proc/self/cmdline``, ``environ``, ``fd`` or the working directory finds nothing to forge.

What remains possible. The program runs in the same interpreter as the runner, so determined
in-process code can still forge a pass: read the secret from the runner's frame
(``sys._getframe(1).f_locals``), from ``gc.get_objects()`` or memory through ``ctypes``, or set a
trace function on the runner's own frame and jump to the line that writes the secret. It can always
make asserts pass without solving the task (an object whose ``__eq__`` returns ``True``, patching the
functions a test calls). The isolation bounds the damage such a program can do, not its score.
``RLIMIT_NPROC`` is not enforced for root (in the sandbox, uid 0 maps to host root), so as root a
``ctypes`` fork bomb is stopped only by the timeout; run evaluations as an unprivileged user.

A prelude runs before the program as a second, in-process layer (it can be undone, e.g. through
``ctypes``, and matters mostly with ``unsafe_exec``): ``socket.socket`` and friends raise, process
creation (``os.system``, ``fork``, ``exec*``, ``spawn*``, ``posix_spawn*``, ``subprocess``) raises,
and ``open``/``os.open`` refuse to write, and ``os.remove``/``rename``/``mkdir``/... to change paths,
outside the working directory.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BWRAP = "bwrap"
INSTALL_HINT = "install it with `apt-get install bubblewrap` (or your distribution's bubblewrap package)"

PRELUDE = r"""
import builtins as _b, io as _io, os as _os, posix as _posix, socket as _socket, subprocess as _subprocess

def _soka_blocked(*_a, **_k):
    raise PermissionError("blocked by the evaluation sandbox")

class _SokaNoSocket:
    def __init__(self, *_a, **_k):
        raise PermissionError("network access is blocked by the evaluation sandbox")

_socket.socket = _SokaNoSocket
_socket.SocketType = _SokaNoSocket
for _n in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname"):
    setattr(_socket, _n, _soka_blocked)
for _n in ("system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve", "execvp", "execvpe",
           "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl",
           "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp", "setuid", "chroot"):
    for _m in (_os, _posix):
        if hasattr(_m, _n):
            setattr(_m, _n, _soka_blocked)
_subprocess.Popen = _soka_blocked
_subprocess.run = _subprocess.call = _subprocess.check_call = _subprocess.check_output = _soka_blocked
_subprocess.getoutput = _subprocess.getstatusoutput = _soka_blocked

_SOKA_ROOT = _os.path.realpath(_os.getcwd())

def _soka_inside(path):
    if isinstance(path, int):
        return True
    real = _os.path.realpath(_os.fsdecode(path))
    return real == _SOKA_ROOT or real.startswith(_SOKA_ROOT + _os.sep)

_soka_open = _io.open

def _soka_guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _soka_inside(file):
        raise PermissionError("writing outside the working directory is blocked by the evaluation sandbox")
    return _soka_open(file, mode, *args, **kwargs)

_b.open = _io.open = _soka_guarded_open
_soka_os_open = _os.open
_SOKA_WRITE_FLAGS = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_APPEND | _os.O_TRUNC

def _soka_guarded_os_open(path, flags, *args, **kwargs):
    if flags & _SOKA_WRITE_FLAGS and not _soka_inside(path):
        raise PermissionError("writing outside the working directory is blocked by the evaluation sandbox")
    return _soka_os_open(path, flags, *args, **kwargs)

_os.open = _posix.open = _soka_guarded_os_open

def _soka_paths_inside(fn):
    def guarded(*args, **kwargs):
        for arg in args:
            if isinstance(arg, (str, bytes, _os.PathLike)) and not _soka_inside(arg):
                raise PermissionError("changing files outside the working directory is blocked by the evaluation sandbox")
        return fn(*args, **kwargs)
    return guarded

for _n in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod",
           "chown", "lchown", "link", "symlink", "mkdir", "mkfifo", "mknod", "utime"):
    for _m in (_os, _posix):
        if hasattr(_m, _n):
            setattr(_m, _n, _soka_paths_inside(getattr(_m, _n)))
del _n, _m
"""


RUNNER = r"""
import builtins, json, os, resource, sys, threading, types


def _soka_run(secret_fd, nproc, prelude):
    # The secret lives only in this frame; its pipe is closed before any program code runs.
    secret = b""
    while chunk := os.read(secret_fd, 4096):
        secret += chunk
    os.close(secret_fd)
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    with open("program.py", encoding="utf-8") as fh:
        program = compile(fh.read(), "program.py", "exec")
    with open("tests.json", encoding="utf-8") as fh:
        tests = [compile(t, "tests.py", "exec") for t in json.load(fh)]
    # Kept before the program runs: it may replace the module attributes.
    settrace, setprofile, write, exit_ = sys.settrace, sys.setprofile, os.write, os._exit
    thread_settrace, thread_setprofile = threading.settrace, threading.setprofile
    out, err = sys.stdout, sys.stderr
    exec(compile(prelude, "prelude.py", "exec"), {"__name__": "_soka_prelude"})
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    sys.argv = ["program.py"]
    exec(program, main.__dict__)
    settrace(None); setprofile(None); thread_settrace(None); thread_setprofile(None)
    for test in tests:
        exec(test, main.__dict__); settrace(None); setprofile(None)
    for stream in (out, err):
        try:
            stream.flush()
        except Exception:
            pass
    write(1, b"\n" + secret + b"\n")
    exit_(0)


_soka_run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
"""


@dataclass(frozen=True)
class Limits:
    """Resource limits for one run."""

    timeout_s: float = 10.0
    memory_bytes: int = 2 * 1024**3
    file_size_bytes: int = 16 * 1024**2
    max_processes: int = 0


@dataclass(frozen=True)
class RunResult:
    """Outcome of one run: ``passed`` when the program and every test ran and the runner reported it."""

    passed: bool
    returncode: int | None
    timed_out: bool
    error: str | None


class SandboxUnavailableError(RuntimeError):
    """No working bubblewrap, and running without OS isolation was not allowed (``unsafe_exec``)."""


def _preexec(limits: Limits) -> None:
    """Lower this (forked, not yet exec'd) child's resource limits. Runs between fork and exec.

    ``RLIMIT_NPROC`` is set later, by the runner inside the sandbox: here it would stop ``bwrap``
    itself from creating the sandbox's processes."""
    cpu = int(limits.timeout_s) + 1
    for res, value in (
        (resource.RLIMIT_AS, limits.memory_bytes),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_FSIZE, limits.file_size_bytes),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(res, (value, value))


def _bwrap_prefix(bwrap: str, workdir: str) -> list[str]:
    """The ``bwrap`` command line (up to the program) that isolates a process with ``workdir`` writable."""
    return [
        bwrap,
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        # no tmpfs over /tmp: the interpreter (a virtual environment) may live there; /tmp stays read-only
        "--bind", workdir, workdir,
        "--chdir", workdir,
        "--unshare-all",
        "--cap-drop", "ALL",
        "--die-with-parent",
        "--new-session",
        "--",
    ]  # fmt: skip


@functools.cache
def isolation_error(bwrap: str = BWRAP) -> str | None:
    """``None`` when ``bwrap`` is installed and isolates a trivial Python run, else what is wrong.

    The answer is cached per ``bwrap`` name: the self-test costs one sandboxed interpreter start."""
    path = shutil.which(bwrap)
    if path is None:
        return f"bubblewrap ({bwrap!r}) is not installed, so MBPP programs cannot be isolated; {INSTALL_HINT}"
    with tempfile.TemporaryDirectory(prefix="soka-eval-check-") as workdir:
        try:
            proc = subprocess.run(
                [*_bwrap_prefix(path, workdir), sys.executable, "-I", "-c", "pass"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"bubblewrap ({path}) failed its self-test ({exc}); {INSTALL_HINT}"
    if proc.returncode != 0:
        detail = _error_line(proc.stderr.decode("utf-8", "replace")) or f"exit status {proc.returncode}"
        return (
            f"bubblewrap ({path}) failed its self-test ({detail}); it needs user namespaces "
            f"(in a container: allow them, or run it privileged); or {INSTALL_HINT}"
        )
    return None


def _environment(workdir: str) -> dict[str, str]:
    closed = "http://127.0.0.1:9"
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "http_proxy": closed,
        "https_proxy": closed,
        "HTTP_PROXY": closed,
        "HTTPS_PROXY": closed,
        "all_proxy": closed,
        "no_proxy": "",
    }


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            return fh.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1].strip()[:500] if lines else ""


def run_program(
    source: str,
    limits: Limits | None = None,
    python: str | None = None,
    *,
    tests: Sequence[str] = (),
    unsafe_exec: bool = False,
) -> RunResult:
    """Run ``source``, then each of ``tests`` (trusted statements such as asserts) in one isolated child
    interpreter, and report the outcome. Raises :class:`SandboxUnavailableError` when ``bwrap`` does not
    work, unless ``unsafe_exec`` allows running with only the rlimits and the prelude."""
    limits = limits or Limits()
    problem = isolation_error(BWRAP)
    if problem and not unsafe_exec:
        raise SandboxUnavailableError(f"{problem}; or pass unsafe_exec=True to run without OS isolation")
    with tempfile.TemporaryDirectory(prefix="soka-eval-") as workdir:
        Path(workdir, "program.py").write_text(source, encoding="utf-8")
        Path(workdir, "tests.json").write_text(json.dumps(list(tests)), encoding="utf-8")
        out_path, err_path = Path(workdir) / "stdout.txt", Path(workdir) / "stderr.txt"
        secret = secrets.token_hex(16)
        secret_r, secret_w = os.pipe()
        # 32 bytes fit in the pipe buffer, so the write end can be closed before the child starts.
        os.write(secret_w, secret.encode())
        os.close(secret_w)
        python = python or sys.executable
        command = [
            python,
            "-I",
            "-X",
            "utf8",
            "-c",
            RUNNER,
            str(secret_r),
            str(limits.max_processes),
            PRELUDE,
        ]
        if not problem:
            command = _bwrap_prefix(shutil.which(BWRAP) or BWRAP, workdir) + command
        timed_out = False
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = subprocess.Popen(
                    command,
                    cwd=workdir,
                    env=_environment(workdir),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    preexec_fn=lambda: _preexec(limits),
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(secret_r,),
                )
                os.close(secret_r)
                secret_r = -1
                try:
                    proc.wait(timeout=limits.timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    _kill_group(proc)
        finally:
            if secret_r >= 0:
                os.close(secret_r)
        if timed_out:
            return RunResult(False, proc.returncode, True, f"timeout after {limits.timeout_s:g} s")
        code = proc.returncode
        reported = _tail(out_path, 200).endswith(secret)
        if code == 0 and reported:
            return RunResult(True, 0, False, None)
        if code == 0:
            return RunResult(False, 0, False, "exited before running all tests")
        message = _error_line(_tail(err_path))
        if not message and code is not None and code < 0:
            message = f"killed by signal {signal.Signals(-code).name}"
        return RunResult(False, code, False, message or f"exit status {code}")


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the child's whole process group (it leads its own session) and reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL'd processes exit
        proc.kill()
        proc.wait()
