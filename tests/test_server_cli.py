"""`ouroboros serve` as a command: a real process on a tiny pair saved to disk, its banner, its
shutdown (the pool saved), and settings refused before anything loads."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from server_helpers import client, wait_for  # noqa: E402
from tiny_models import save_tiny_pair  # noqa: E402

from ouroboros import PhrasePool  # noqa: E402
from ouroboros.cli import main as cli_main  # noqa: E402


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("pair"))


def test_cli_refuses_a_corrupted_pool_file(pair_dirs, tmp_path, capsys):
    path = tmp_path / "pool.json"
    path.write_text("garbage")
    target, draft = pair_dirs
    code = cli_main(["serve", "--target", str(target), "--draft", str(draft), "--dtype", "float32",
                     "--pool-file", str(path)])
    assert code == 2
    assert str(path) in capsys.readouterr().err
    assert path.read_text() == "garbage"


def test_cli_serves_and_saves_the_pool_on_shutdown(pair_dirs, tmp_path):
    target, draft = pair_dirs
    path = tmp_path / "pool.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OUROBOROS_API_KEY": "k3y"}
    process = subprocess.Popen([sys.executable, "-m", "ouroboros.cli", "serve", "--target", str(target),
                                "--draft", str(draft), "--dtype", "float32", "--port", str(port),
                                "--pool-file", str(path), "--log-level", "warning"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert process.poll() is None, process.communicate()[1]
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=90)
        c = client(url, api_key="k3y")
        assert [m.id for m in c.models.list().data] == ["target"]  # the target directory's name
        assert c.completions.create(model="target", prompt="Hello", max_tokens=8).usage.completion_tokens == 8
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode in (0, 130), err
    assert len(PhrasePool.load(path)[0]) > 0


def test_cli_banner_says_where_what_and_how(pair_dirs):
    """--port 0 binds a free port, and the banner names it: the URL in the banner is the one that answers."""
    target, draft = pair_dirs
    argv = [sys.executable, "-m", "ouroboros.cli", "serve", "--target", str(target), "--draft", str(draft), "--dtype",
            "float32", "--port", "0", "--method", "speculative", "--max-queue", "5", "--api-key", "k3y",
            "--log-level", "warning", "--kv-memory", "0.5"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            banner = "".join(process.stdout.readline() for _ in range(7))
            assert banner.startswith("ouroboros serve: http://127.0.0.1:"), banner
            assert "model id: target" in banner and "method:   speculative" in banner
            assert "API key:  required" in banner and "up to 5 waiting" in banner
            assert "warm-up:  one short generation first" in banner  # float32: no fast path to compile
            assert "KV cache: 0.5 GiB for the running requests' keys and values (--kv-memory)" in banner
            url = banner.split()[2].removesuffix("/v1")
            health = httpx.get(url + "/health", timeout=30)  # bound before the banner: no retry
            assert health.status_code == 200 or health.json()["status"] == "warming up"
            wait_for(lambda: httpx.get(url + "/health", timeout=5).status_code == 200)
            assert [m.id for m in client(url, api_key="k3y").models.list().data] == ["target"]
        finally:
            process.send_signal(signal.SIGINT)  # as Ctrl-C: stops the server whatever the test found
            try:
                _, err = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                raise
    assert process.returncode == 0, err
    assert "ouroboros serve: ready (warm-up took" in err


@pytest.mark.parametrize("argv, message", [
    (["--max-queue", "-1"], "--max-queue must be >= 0"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--default-max-tokens", "0"], "--default-max-tokens must be >= 1"),
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--kv-memory", "0"], "--kv-memory must be a number of GiB > 0"),
    (["--method", "speculative"], "--method speculative needs a draft model"),
])
def test_cli_refuses_bad_serve_settings_before_loading(argv, message, capsys):
    assert cli_main(["serve", "--target", "/nonexistent", *argv]) == 2
    assert message in capsys.readouterr().err
