"""``palsctl gateway``: every bad command line is one error line and exit status 2."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from palsctl.cli import main as cli_main

pytestmark = pytest.mark.timeout(60)
UP = ["--upstream", "http://127.0.0.1:8000"]


def bad_token_file(tmp_path, kind):
    if kind == "missing dir":
        return str(tmp_path / "no-such-dir" / "tok")
    if kind == "directory":
        return str(tmp_path)
    p = tmp_path / "tok"
    p.write_text("a-perfectly-good-token\n")
    os.chmod(p, 0o644 if kind == "world-readable" else 0o600)
    if kind == "empty":
        p.write_text("")
    return str(p)


@pytest.mark.parametrize("argv,words", [
    (["--upstream", "http://"], "--upstream: upstream URL has no host"),
    (["--upstream", "http://127.0.0.1:99999"], "--upstream: upstream URL is invalid"),
    (["--upstream", "127.0.0.1:8000"], "http(s) URL"),
    (UP + ["--listen", "127.0.0.1:99999"], "--listen"),
    (UP + ["--listen", "127.0.0.1"], "HOST:PORT"),
    (UP + ["--listen", "127.0.0.1:65535"], "give --control"),
    (UP + ["--control", "0.0.0.0:0"], "--insecure"),
    (UP + ["--control", "[::]:9000"], "loopback"),
    (UP + ["--duration-s", "nan"], "--duration-s"),
    (UP + ["--upstream-timeout-s", "-1"], "--upstream-timeout-s"),
    (UP + ["--header-timeout-s", "inf"], "--header-timeout-s"),
    (UP + ["--max-body-mib", "0"], "--max-body-mib"),
    (UP + ["--max-body-mib", "200"], "--max-buffered-mib"),
    (UP + ["--max-connections", "0"], "--max-connections"),
    (UP + ["--max-concurrency", "0"], "--max-concurrency"),
])
def test_bad_arguments_are_one_line_and_exit_2(capsys, argv, words):
    assert cli_main(["gateway", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("palsctl gateway: error:") and err.count("\n") == 1, err
    assert words in err and "Traceback" not in err


@pytest.mark.parametrize("kind,words", [("missing dir", "cannot create"),
                                        ("directory", "not a regular file"),
                                        ("world-readable", "chmod 600"),
                                        ("empty", "at least 8")])
def test_bad_token_file_is_one_line_and_exit_2(tmp_path, capsys, kind, words):
    path = bad_token_file(tmp_path, kind)
    assert cli_main(["gateway", *UP, "--token-file", path, "--listen", "127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and path in err, err


def test_no_token_file_is_created_for_a_bad_command_line(tmp_path, capsys):
    tok = tmp_path / "tok"
    assert cli_main(["gateway", "--upstream", "http://", "--token-file", str(tok)]) == 2
    assert not tok.exists()


def test_insecure_control_starts_warns_and_stops(tmp_path):
    tok = tmp_path / "tok"
    proc = subprocess.run(
        [sys.executable, "-m", "palsctl", "gateway", *UP, "--listen", "127.0.0.1:0",
         "--control", "0.0.0.0:0", "--insecure", "--token-file", str(tok), "--duration-s", "0.3"],
        capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert "gateway http://127.0.0.1:" in proc.stdout and "control http://0.0.0.0:" in proc.stdout
    assert "plain HTTP" in proc.stderr and "Traceback" not in proc.stderr
    assert (os.stat(tok).st_mode & 0o777) == 0o600


def test_a_port_in_use_is_one_line_and_exit_2():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "palsctl", "gateway", *UP, "--listen", f"127.0.0.1:{port}",
             "--control", "127.0.0.1:0", "--duration-s", "0.3"],
            capture_output=True, text=True, timeout=50)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(err) == 1 and "--listen" in err[0] and "cannot listen" in err[0], proc.stderr
    assert "Traceback" not in proc.stderr
