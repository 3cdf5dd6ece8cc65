"""Run untrusted Python (generated MBPP programs) in a separate, limited process.

What is done, for every program:

- a fresh interpreter (``python -I``: no user site, ``PYTHON*`` variables ignored) in a new session,
  so that on timeout the whole process group is killed with ``os.killpg``;
- a fresh temporary directory as working directory, ``$HOME`` and ``$TMPDIR``, removed afterwards;
- a stripped environment (``PATH``, ``HOME``, ``TMPDIR``, ``LANG`` and proxy variables pointing at a
  closed port);
- ``resource.setrlimit`` in ``preexec_fn``: address space, CPU seconds, file size, number of
  processes (``RLIMIT_NPROC``) and no core dumps;
- stdout/stderr go to files in the temporary directory (bounded by the file-size limit), not to
  pipes in the evaluating process;
- a wall-clock timeout;
- a pass needs exit status 0 *and* a random token printed after the last assert, so a program that
  exits early (``sys.exit(0)``, ``os._exit(0)``) fails.

A prelude runs before the program (best effort, in-process guards that determined code can undo, e.g.
through ``ctypes``): ``socket.socket`` and friends raise, process creation (``os.system``,
``os.fork``, ``os.exec*``, ``os.spawn*``, ``os.posix_spawn*``, ``subprocess.Popen``) raises, and
``open``/``os.open`` refuse to write, and ``os.remove``/``rename``/``mkdir``/``chmod``/... to change
paths, outside the working directory.

What is NOT contained: this is not an OS sandbox (no namespaces, seccomp or chroot). The program can
read any file the user can, and code that bypasses the prelude can write anywhere the user can.
``RLIMIT_NPROC`` counts all processes of the user and is not enforced for root. Run evaluations of
untrusted models as an unprivileged user, ideally in a container.
"""

from __future__ import annotations

import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class Limits:
    """Resource limits for one run."""

    timeout_s: float = 10.0
    memory_bytes: int = 2 * 1024**3
    file_size_bytes: int = 16 * 1024**2
    max_processes: int = 0


@dataclass(frozen=True)
class RunResult:
    """Outcome of one sandboxed run: ``passed`` when the program ran to its end and exited with status 0."""

    passed: bool
    returncode: int | None
    timed_out: bool
    error: str | None


def _preexec(limits: Limits) -> None:
    """Lower this (forked, not yet exec'd) child's resource limits. Runs between fork and exec."""
    cpu = int(limits.timeout_s) + 1
    for res, value in (
        (resource.RLIMIT_AS, limits.memory_bytes),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_FSIZE, limits.file_size_bytes),
        (resource.RLIMIT_NPROC, limits.max_processes),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(res, (value, value))


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


def run_program(source: str, limits: Limits | None = None, python: str | None = None) -> RunResult:
    """Run ``source`` (the prelude is prepended) in a limited child interpreter and report the outcome."""
    limits = limits or Limits()
    with tempfile.TemporaryDirectory(prefix="soka-eval-") as workdir:
        program = Path(workdir) / "program.py"
        token = secrets.token_hex(16)
        epilogue = (
            f"\nimport sys as _soka_sys\n_soka_sys.stdout.write('\\n{token}\\n')\n_soka_sys.stdout.flush()\n"
        )
        program.write_text(PRELUDE + "\n" + source + "\n" + epilogue, encoding="utf-8")
        out_path, err_path = Path(workdir) / "stdout.txt", Path(workdir) / "stderr.txt"
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [python or sys.executable, "-I", "-X", "utf8", str(program)],
                cwd=workdir,
                env=_environment(workdir),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=lambda: _preexec(limits),
                start_new_session=True,
                close_fds=True,
            )
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)
        if timed_out:
            return RunResult(False, proc.returncode, True, f"timeout after {limits.timeout_s:g} s")
        code = proc.returncode
        reached_end = token in _tail(out_path, 200)
        if code == 0 and reached_end:
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
