"""`kvtier controller` start-up errors: one line naming the option, exit status 2, nothing served."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.cluster.procs import ROOT, _env, free_port

pytest.importorskip("fastapi")


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "kvtier", "controller", "--port", str(free_port()), *args]
    return subprocess.run(command, env=_env(env or {}), cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--host", "0.0.0.0"), "binding '0.0.0.0', which other machines can reach, needs a token; "
                                "set --token-file or $KVTIER_CONTROLLER_TOKEN"),
        (("--tls-cert", "/nonexistent/cert.pem"), "--tls-cert: cannot load certificate '/nonexistent/cert.pem'"),
        (("--tls-key", "/some/key.pem"), "--tls-key given without --tls-cert"),
        (("--tls-ca", "/nonexistent/ca.pem"), "--tls-ca: cannot load CA bundle '/nonexistent/ca.pem'"),
    ],
)  # fmt: skip
def test_a_bad_start_is_one_error_line_and_status_2(args, message):
    done = start(*args, env={} if "--host" in args else {"KVTIER_CONTROLLER_TOKEN": "s3cret"})
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_a_token_allows_any_interface(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    done = start("--host", "0.0.0.0", "--token-file", str(token), "--tls-key", "k.pem")  # stops at the TLS check
    assert "--tls-key given without --tls-cert" in done.stderr and "needs a token" not in done.stderr
