"""Adversarial MBPP programs: each is scored as a failure, and the evaluating process is unharmed.

What these tests check is what the sandbox guarantees: a wall-clock timeout that kills the whole
process group, memory/file-size limits, a prelude that blocks process creation, sockets and writes
outside the working directory through the usual APIs. They do not claim an OS-level sandbox: the
prelude is best effort (see ``axolotl_soka.eval.sandbox``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from axolotl_soka.eval import score
from axolotl_soka.eval.sandbox import Limits, run_program
from axolotl_soka.eval.scoring import score_many

RECORD = {"task_id": 0, "text": "t", "test_setup_code": "", "test_list": ["assert f() == 1"]}
GOOD = "def f():\n    return 1\n[DONE]"


def _fails(code: str, timeout: float = 3.0) -> str:
    verdict = score("mbpp", code, RECORD, timeout=timeout)
    assert verdict.correct is False
    assert verdict.error
    return verdict.error


def test_infinite_loop_times_out() -> None:
    start = time.monotonic()
    assert "timeout" in _fails("def f():\n    while True:\n        pass\n", timeout=2)
    assert time.monotonic() - start < 15


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
        f"elif pid > 0:\n    io.FileIO({str(pid_file)!r}, 'w').write(str(pid).encode())\n"
        "while True:\n    pass\n"
    )
    result = run_program(code, Limits(timeout_s=3))
    assert result.timed_out and not result.passed
    if not pid_file.exists():  # the fork itself was refused (RLIMIT_NPROC for an unprivileged user)
        return
    pid = int(pid_file.read_text())
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.1)
    pytest.fail(f"child {pid} of a timed-out program is still running")


def test_adversarial_programs_do_not_harm_the_run() -> None:
    """Good programs next to adversarial ones in one parallel batch are still scored correctly."""
    bad = [
        "def f():\n    while True:\n        pass",
        "import os\nwhile True:\n    os.fork()",
        "x = bytearray(64 * 1024**3)",
        "import sys\nsys.exit(0)",
    ]
    completions = [GOOD, *bad, GOOD]
    verdicts = score_many("mbpp", completions, [RECORD] * len(completions), workers=3, timeout=2)
    assert [v.correct for v in verdicts] == [True, False, False, False, False, True]
