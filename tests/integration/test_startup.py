"""`iotmesh run` refuses to start with a one-line reason and a non-zero exit."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from tests.integration.server import RunningServer, child_env, iotmesh_command


def _run(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        iotmesh_command("run", "--mqtt-port", "0", "--coap-port", "0", *args),
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(env),
        cwd=tmp_path,
        check=False,
    )


def _one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("iotmesh: cannot start:")
    for fragment in fragments:
        assert fragment in lines[0]


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run(tmp_path, "--data-dir", str(tmp_path / "d"), "--http-port", str(port))
    _one_line_error(result, f"http port {port}", "already in use")


def test_bad_config_value_and_file(tmp_path: Path) -> None:
    result = _run(tmp_path, "--data-dir", str(tmp_path / "d"), "--http-port", "70000")
    _one_line_error(result, "http.port")
    config = tmp_path / "bad.toml"
    config.write_text("[http]\nprot = 1\n")
    _one_line_error(_run(tmp_path, "--config", str(config)), "http.prot")
    config.write_text("[http\n")
    _one_line_error(_run(tmp_path, "--config", str(config)), "not valid TOML")
    _one_line_error(_run(tmp_path, "--config", str(tmp_path / "missing.toml")), "cannot read")
    env_result = _run(
        tmp_path, "--data-dir", str(tmp_path / "d"), env={"IOTMESH_BUS__PARTITIONS": "zero"}
    )
    _one_line_error(env_result, "bus.partitions")


def test_data_dir_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = _run(tmp_path, "--data-dir", str(blocker / "data"), "--http-port", "0")
    _one_line_error(result, "not writable")


def test_data_dir_in_use(server: RunningServer, tmp_path: Path) -> None:
    result = _run(tmp_path, "--data-dir", str(server.data_dir), "--http-port", "0")
    _one_line_error(result, "in use by another iotmesh process", str(server.pid))


def test_config_file_precedence(tmp_path: Path) -> None:
    """The TOML file is read, and the CLI flag beats it."""
    config = tmp_path / "iotmesh.toml"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config.write_text(f'host = "127.0.0.1"\n[http]\nport = {port}\n')
        result = _run(tmp_path, "--data-dir", str(tmp_path / "d"))  # iotmesh.toml in cwd
    _one_line_error(result, f"http port {port}")
