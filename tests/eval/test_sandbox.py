"""Adversarial MBPP programs: each is scored as a failure, and the evaluating process is unharmed.

What these tests check is what the sandbox guarantees: bubblewrap isolation (read-only file system
outside the work dir, no network, no process outliving the run, the evaluator unreachable), a verdict
the program cannot forge by reading its files or by tracing, a wall-clock timeout that kills the
whole process group, memory/file-size limits, and the in-process prelude as a second layer (see
``axolotl_soka.eval.sandbox``). Tests of the isolation skip where ``bwrap`` is unusable; the others
then run with ``unsafe_exec``, and one test checks that without it nothing runs.

No outcome here depends on the host's speed: a program expected to fail or pass for another reason gets the
default 10 s limit (it needs well under a second), so a slow or loaded host cannot turn its verdict into a
timeout; a program expected to time out is checked by its verdict and by its process being gone, not by how
long the run took.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from axolotl_soka.eval import cli, sandbox
from axolotl_soka.eval.sandbox import Limits, SandboxUnavailableError, isolation_error, run_program
from axolotl_soka.eval.scoring import score, score_many

ISOLATION_PROBLEM = isolation_error()
UNSAFE = ISOLATION_PROBLEM is not None  # the tests of the prelude and limits still run without bwrap
needs_bwrap = pytest.mark.skipif(UNSAFE, reason=f"bubblewrap is unusable here: {ISOLATION_PROBLEM}")

RECORD = {"task_id": 0, "text": "t", "test_setup_code": "", "test_list": ["assert f() == 1"]}
GOOD = "def f():\n    return 1\n[DONE]"


def _fails(code: str, timeout: float = 10.0) -> str:
    verdict = score("mbpp", code, RECORD, timeout=timeout, unsafe_exec=UNSAFE)
    assert verdict.correct is False
    assert verdict.error
    return verdict.error


def _marker() -> str:
    """A string unique to one test, put in the command line of the processes its program starts."""
    return f"soka-marker-{uuid.uuid4().hex}"


def _processes_with(marker: str) -> list[int]:
    """PIDs of live (not zombie) processes whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(") ", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker.encode() in cmdline and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def _assert_no_process_with(marker: str, within: float = 30.0) -> None:
    """Fail unless no process with ``marker`` in its command line is left within ``within`` seconds. A
    SIGKILL'd process exits at once; the generous bound only tells a kill that never happened from a
    host that is busy."""
    deadline = time.monotonic() + within
    while left := _processes_with(marker):
        if time.monotonic() > deadline:
            for pid in left:  # clean up before failing
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"processes {left} started by the program outlived its run")
        time.sleep(0.1)


def test_infinite_loop_times_out() -> None:
    """The wall-clock limit ends an endless loop: the result says so, and the program's process was killed
    (SIGKILL) and reaped. How long the run took is not checked: a loaded host only makes it longer."""
    result = run_program(
        "def f():\n    while True:\n        pass\nf()\n", Limits(timeout_s=2), unsafe_exec=UNSAFE
    )
    assert result.timed_out and not result.passed and result.error == "timeout after 2 s"
    assert result.returncode == -signal.SIGKILL  # killed by the sandbox and waited for: nothing left running


@pytest.mark.parametrize(
    "code",
    [
        "import os\ndef f():\n    while True:\n        os.fork()\n    return 1",
        "import posix\nposix.fork()\ndef f(): return 1",
        "import subprocess\nsubprocess.Popen(['sleep', '100'])\ndef f(): return 1",
        "import subprocess\nwhile True:\n    subprocess.run(['true'])\ndef f(): return 1",
        "import os\nos.system('sleep 100')\ndef f(): return 1",
        "import os\nos.execv('/bin/true', ['true'])\ndef f(): return 1",
    ],
)
def test_process_creation_is_blocked(code: str) -> None:
    assert "blocked" in _fails(code)


def test_huge_allocation_fails() -> None:
    assert "MemoryError" in _fails("x = bytearray(64 * 1024**3)\ndef f(): return 1")


def test_endless_output_is_cut_by_the_file_size_limit() -> None:
    _fails("while True:\n    print('x' * 100000)\ndef f(): return 1", timeout=10)


@pytest.mark.parametrize(
    "writer",
    [
        "open({p!r}, 'w').write('x')",
        "import pathlib\npathlib.Path({p!r}).write_text('x')",
        "import os\nos.close(os.open({p!r}, os.O_WRONLY | os.O_CREAT))",
        "import os\nos.mkdir({p!r})",
    ],
)
def test_writing_outside_the_working_directory_is_blocked(writer: str, tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    assert "blocked" in _fails(writer.format(p=str(target)) + "\ndef f(): return 1")
    assert not target.exists()


def test_deleting_outside_the_working_directory_is_blocked(tmp_path: Path) -> None:
    victim = tmp_path / "keep.txt"
    victim.write_text("keep")
    _fails(f"import os\nos.remove({str(victim)!r})\ndef f(): return 1")
    assert victim.read_text() == "keep"


def test_files_inside_the_working_directory_are_allowed() -> None:
    code = (
        "import os, tempfile\nopen('a.txt', 'w').write('1')\nos.rename('a.txt', 'b.txt')\n"
        "t = tempfile.NamedTemporaryFile(delete=False)\nt.write(b'1')\nt.close()\n"
        "def f(): return int(open('b.txt').read())\n"
    )
    assert score("mbpp", code, RECORD, unsafe_exec=UNSAFE).correct


def test_network_is_blocked() -> None:
    assert "blocked" in _fails(
        "import socket\nsocket.create_connection(('127.0.0.1', 80), timeout=1)\ndef f(): return 1"
    )


def test_environment_is_stripped_and_home_is_the_workdir() -> None:
    os.environ["SOKA_EVAL_SECRET"] = "s3cret"
    try:
        code = (
            "import os\nassert 'SOKA_EVAL_SECRET' not in os.environ\n"
            "assert os.environ['HOME'] == os.getcwd() == os.environ['TMPDIR']\n"
        )
        assert run_program(code, unsafe_exec=UNSAFE).passed
    finally:
        del os.environ["SOKA_EVAL_SECRET"]


def test_timeout_kills_the_process_group() -> None:
    """A program that escapes the prelude (libc fork through ctypes) still loses its child on timeout."""
    marker = _marker()
    code = (
        "import ctypes, os\nlibc = ctypes.CDLL(None)\n"
        f"if libc.fork() == 0:\n    libc.system(b'sleep 300; : {marker}')\n    os._exit(0)\n"
        "while True:\n    pass\n"
    )
    result = run_program(code, Limits(), unsafe_exec=UNSAFE)
    assert result.timed_out and not result.passed
    _assert_no_process_with(marker)


def test_adversarial_programs_do_not_harm_the_run() -> None:
    """Good programs next to adversarial ones in one parallel batch are still scored correctly."""
    bad = [
        "def f():\n    while True:\n        pass",
        "import os\nwhile True:\n    os.fork()",
        "x = bytearray(64 * 1024**3)",
        "import sys\nsys.exit(0)",
    ]
    completions = [GOOD, *bad, GOOD]
    # the default 10 s limit: the good programs share the CPUs with the endless loop and must not time out
    verdicts = score_many("mbpp", completions, [RECORD] * len(completions), workers=3, unsafe_exec=UNSAFE)
    assert [v.correct for v in verdicts] == [True, False, False, False, False, True]
    assert verdicts[1].error == "timeout after 10 s"


# --- Hostile programs against the OS isolation and the verdict ------------------------------------------


@pytest.fixture()
def outside(tmp_path: Path) -> Iterator[Path]:
    """A sentinel directory outside the work dir, holding ``keep.txt``, in /var/tmp when that is writable
    (elsewhere in the test's own temporary directory)."""
    parent = "/var/tmp" if os.access("/var/tmp", os.W_OK) else str(tmp_path)
    path = Path(tempfile.mkdtemp(prefix="soka-sentinel-", dir=parent))
    (path / "keep.txt").write_text("keep")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"" for p in path.rglob("*")}


@pytest.fixture()
def listener() -> Iterator[socket.socket]:
    """A TCP listener on 127.0.0.1 in the evaluating process."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock


def _hostile(code: str, tests: list[str] | None = None) -> sandbox.RunResult:
    """Run ``code`` with the default limits; the program must not pass."""
    result = run_program(code, Limits(), tests=["assert f() == 1"] if tests is None else tests)
    assert not result.passed, result
    return result


def test_without_bwrap_nothing_runs_unless_unsafe(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A missing bwrap is refused by the command line (before any model loads) and by the Python API,
    with what is missing and how to install it; ``--unsafe-exec`` / ``unsafe_exec=True`` runs anyway."""
    monkeypatch.setattr(sandbox, "BWRAP", "soka-no-such-bwrap")
    monkeypatch.setattr(cli.model_mod, "load", lambda *_a, **_k: pytest.fail("a model was loaded"))
    (tmp_path / "config.json").write_text("{}")  # passes as a base model directory; nothing is loaded
    assert cli.main(["--task", "mbpp", "--base-model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bubblewrap" in err and "apt-get install bubblewrap" in err and "--unsafe-exec" in err
    with pytest.raises(SandboxUnavailableError, match="apt-get install bubblewrap.*unsafe_exec=True"):
        run_program("pass")
    with pytest.raises(SandboxUnavailableError):
        score("mbpp", GOOD, RECORD)
    assert score("mbpp", GOOD, RECORD, unsafe_exec=True).correct
    args = cli.build_parser().parse_args(["--task", "mbpp", "--base-model", "x", "--unsafe-exec"])
    assert args.unsafe_exec


@needs_bwrap
def test_reading_own_files_cmdline_environ_and_fds_finds_no_secret() -> None:
    """The old attack: find the pass token in the own source (or through /proc/self/cmdline) and print it.
    The program prints every 32-hex-digit string it can find anywhere and exits 0 without defining f."""
    code = r"""
import os, re
seen = []
for name in os.listdir('.'):
    seen.append(open(name, 'rb').read())
for name in ('cmdline', 'environ'):
    for pid in [p for p in os.listdir('/proc') if p.isdigit()]:
        try:
            seen.append(open(f'/proc/{pid}/{name}', 'rb').read())
        except OSError:
            pass
for fd in range(3, 256):
    try:
        os.set_blocking(fd, False)
        seen.append(os.read(fd, 4096))
    except OSError:
        pass
found = set(re.findall(rb'[0-9a-f]{32}', b'\n'.join(seen)))
os.write(1, b'\n' + b'\n'.join(found) + b'\n')
os._exit(0)
"""
    result = _hostile(code)
    assert result.returncode == 0 and result.error == "exited before running all tests"


# A trace function that, on a line event in any module-level code but the program's own, jumps to
# that code's last line: with the asserts in the program's file (the old design) this scores a pass.
_JUMP = (
    "import sys, dis\n"
    "def jump(frame, event, arg):\n"
    "    code = frame.f_code\n"
    "    if event == 'line' and code.co_name == '<module>' and code.co_filename != 'program.py':\n"
    "        last = max(line for _, line in dis.findlinestarts(code) if line)\n"
    "        if frame.f_lineno < last:\n"
    "            try:\n                frame.f_lineno = last\n"
    "            except ValueError:\n                pass\n"
    "    return jump\n"
)


@needs_bwrap
@pytest.mark.parametrize(
    "code",
    [
        # armed by the program, for everything that runs after it
        _JUMP + "def f():\n    return 0\nsys.settrace(jump)\n",
        # armed from inside f() while an assert runs, on the calling (test) frame
        _JUMP + "def f():\n    sys.settrace(jump)\n    sys._getframe(1).f_trace = jump\n    return 0\n",
    ],
)
def test_settrace_cannot_skip_the_asserts(code: str) -> None:
    result = _hostile(code, tests=["assert f() == 1", "assert f() == 2", "x = 1"])
    assert "AssertionError" in (result.error or "")


@needs_bwrap
@pytest.mark.parametrize(
    "attack",
    [
        "import _io\n_io.FileIO({d!r} + '/new.txt', 'w').write(b'x')",
        "import os\nfd = os.open({d!r}, os.O_RDONLY)\n"
        "os.close(os.open('new.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd))",
        "import os\nfd = os.open({d!r}, os.O_RDONLY)\nos.unlink('keep.txt', dir_fd=fd)",
        "import ctypes\nctypes.CDLL(None).unlink(({d!r} + '/keep.txt').encode())",
        "import ctypes\nctypes.CDLL(None).system(('echo x > ' + {d!r} + '/new.txt').encode())\n"
        "raise SystemExit('ran')",
    ],
)
def test_files_outside_the_work_dir_cannot_change(attack: str, outside: Path) -> None:
    before = _snapshot(outside)
    _hostile(attack.format(d=str(outside)))
    assert _snapshot(outside) == before


@needs_bwrap
def test_no_connection_reaches_a_loopback_listener(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    code = (
        "import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\ns.settimeout(5)\n"
        f"s.connect(('127.0.0.1', {port}))\ns.send(b'x')\n"
    )
    result = _hostile(code)
    assert re.search(r"ConnectionRefused|unreachable|Errno", result.error or ""), result
    listener.setblocking(False)
    assert select.select([listener], [], [], 0.5)[0] == []
    with pytest.raises(BlockingIOError):
        listener.accept()


@needs_bwrap
@pytest.mark.parametrize(
    "spawn",
    [
        "from multiprocessing.util import spawnv_passfds\n"
        "spawnv_passfds(b'/bin/sh', [b'sh', b'-c', b'sleep 300; : {m}'], ())\n",
        "import ctypes\nassert ctypes.CDLL(None).system(b'(sleep 300; : {m}) &') == 0, 'refused'\n",
        "import ctypes, os\nlibc = ctypes.CDLL(None)\npid = libc.fork()\nassert pid >= 0, 'refused'\n"
        "if pid == 0:\n    libc.setsid()\n    libc.system(b'sleep 300; : {m}')\n    os._exit(0)\n",
    ],
)
def test_no_process_outlives_the_run(spawn: str) -> None:
    """Processes started around the prelude (and a ``fork`` + ``setsid`` survivor) end with the run. The
    program then exits with ``spawned`` as its error, which shows the start itself worked."""
    marker = _marker()
    result = _hostile(spawn.format(m=marker) + "import time\ntime.sleep(0.5)\nraise SystemExit('spawned')\n")
    if "refused" in (result.error or ""):
        pytest.skip("the process start itself was refused (RLIMIT_NPROC for an unprivileged user)")
    assert result.error == "spawned"
    _assert_no_process_with(marker)


@needs_bwrap
def test_the_evaluator_cannot_be_killed() -> None:
    """Signals to the parent, to the evaluator's PID and to every process: none leaves the sandbox."""
    code = (
        "import ctypes, os\nlibc = ctypes.CDLL(None)\n"
        f"libc.kill(os.getppid(), 9)\nlibc.kill({os.getpid()}, 9)\nlibc.kill({os.getppid()}, 9)\n"
        "libc.kill(-1, 9)\n"
    )
    result = _hostile(code)
    assert result.returncode != 0
    os.kill(os.getpid(), 0)  # still here; and the harness above returned a verdict
    assert score("mbpp", GOOD, RECORD).correct


@needs_bwrap
def test_an_interpreter_under_tmp_runs_in_the_sandbox(tmp_path: Path) -> None:
    """The evaluator's interpreter may live anywhere, /tmp included (a virtual environment in a fresh clone
    there): the sandbox keeps the host's /tmp visible, read-only, instead of hiding it under a tmpfs."""
    import subprocess
    import sys

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    assert str(venv).startswith(tempfile.gettempdir())
    result = run_program(
        "def f():\n    return 1\n", python=str(venv / "bin" / "python"), tests=["assert f() == 1"]
    )
    assert result.passed, result.error
