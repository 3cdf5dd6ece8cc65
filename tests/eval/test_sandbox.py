"""Adversarial MBPP programs: each is scored as a failure, and the evaluating process is unharmed.

What these tests check is what the sandbox guarantees: a wall-clock timeout that kills the whole
process group, memory/file-size limits, a prelude that blocks process creation, sockets and writes
outside the working directory through the usual APIs. They do not claim an OS-level sandbox: the
prelude is best effort (see ``axolotl_soka.eval.sandbox``).

No outcome here depends on the host's speed: a program expected to fail or pass for another reason gets the
default 10 s limit (it needs well under a second), so a slow or loaded host cannot turn its verdict into a
timeout; a program expected to time out is checked by its verdict and by its process being gone, not by how
long the run took.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from axolotl_soka.eval import score
from axolotl_soka.eval.sandbox import Limits, run_program
from axolotl_soka.eval.scoring import score_many

RECORD = {"task_id": 0, "text": "t", "test_setup_code": "", "test_list": ["assert f() == 1"]}
GOOD = "def f():\n    return 1\n[DONE]"


def _fails(code: str, timeout: float = 10.0) -> str:
    verdict = score("mbpp", code, RECORD, timeout=timeout)
    assert verdict.correct is False
    assert verdict.error
    return verdict.error


def _wait_until_gone(pid: int, within: float = 30.0) -> None:
    """Fail unless process ``pid`` has exited (or is a zombie) within ``within`` seconds. A SIGKILL'd process
    exits at once; the generous bound only tells a kill that never happened from a host that is busy."""
    deadline = time.monotonic() + within
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"process {pid} of a timed-out program is still running")
        time.sleep(0.1)


def test_infinite_loop_times_out() -> None:
    """The wall-clock limit ends an endless loop: the result says so, and the program's process was killed
    (SIGKILL) and reaped. How long the run took is not checked: a loaded host only makes it longer."""
    result = run_program("def f():\n    while True:\n        pass\nf()\n", Limits(timeout_s=2))
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
    assert score("mbpp", code, RECORD).correct


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
        assert run_program(code).passed
    finally:
        del os.environ["SOKA_EVAL_SECRET"]


def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    """A program that escapes the prelude (libc fork through ctypes) still loses its child on timeout."""
    pid_file = tmp_path / "child.pid"
    code = (
        "import ctypes, io, time\n"
        "pid = ctypes.CDLL(None).fork()\n"
        "if pid == 0:\n    time.sleep(300)\n"
        f"else:\n    io.FileIO({str(pid_file)!r}, 'w').write(str(pid).encode())\n"
        "while True:\n    pass\n"
    )
    result = run_program(code, Limits())
    assert result.timed_out and not result.passed
    pid = int(pid_file.read_text())  # written within the default limit, however loaded the host
    if pid < 0:
        pytest.skip("the fork itself was refused (RLIMIT_NPROC for an unprivileged user)")
    _wait_until_gone(pid)


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
    verdicts = score_many("mbpp", completions, [RECORD] * len(completions), workers=3)
    assert [v.correct for v in verdicts] == [True, False, False, False, False, True]
    assert verdicts[1].error == "timeout after 10 s"
