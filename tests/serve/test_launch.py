"""Choosing the model, the exposure warning, and the command line."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from monkeytune.cli import main
from monkeytune.serve.launch import NoModelError, exposure_warning, find_demo_model


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_hosts_need_no_warning(host):
    assert exposure_warning(host) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "myhost.example"])
def test_other_hosts_are_warned_about(host):
    text = exposure_warning(host)
    assert text and host in text and "127.0.0.1" in text


def test_no_demo_model_explains_how_to_get_one(tmp_path):
    with pytest.raises(NoModelError, match="monkeytune train examples/tiny-cpu.yaml") as err:
        find_demo_model(tmp_path / "outputs" / "demo")
    assert "--model" in str(err.value) and "monkeytune demo" in str(err.value)


def test_demo_model_prefers_final_folders_and_skips_checkpoints(tmp_path, parrot_dir):
    root = tmp_path / "demo"
    final = root / "monkey" / "final"
    shutil.copytree(parrot_dir, final)
    shutil.copytree(parrot_dir, root / "monkey" / "checkpoints" / "step-00000010")
    later = root / "other-model"
    shutil.copytree(parrot_dir, later)
    newer = time.time() + 60
    os.utime(later / "config.json", (newer, newer))
    assert find_demo_model(root) == final
    shutil.rmtree(final)
    assert find_demo_model(root) == later
    # The demo's own layout: its Monkey-way model wins, then the from-scratch one.
    for stage in ("baseline", "stage1", "stage2"):
        shutil.copytree(parrot_dir, root / "models" / stage)
    assert find_demo_model(root) == root / "models" / "stage2"
    shutil.rmtree(root / "models" / "stage2")
    assert find_demo_model(root) == root / "models" / "stage1"


def test_cli_without_a_model_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gradio")
    monkeypatch.chdir(tmp_path)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "no trained demo model" in err and "monkeytune train examples/tiny-cpu.yaml" in err


def test_cli_with_a_bad_folder_and_exposed_host(tmp_path, capsys):
    pytest.importorskip("gradio")
    assert main(["serve", "--model", str(tmp_path / "missing"), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "WARNING: serving on 0.0.0.0" in err and "missing" in err



def test_cli_serves_the_page_until_interrupted(parrot_dir, free_port):
    """``monkeytune serve`` in its own process: prints the address, serves the page, exits 0 on Ctrl-C."""
    pytest.importorskip("gradio")
    import signal
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    code = "import sys; from monkeytune.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    # As Ctrl-C in a terminal: SIGINT handled in the child even when this run ignores it (a
    # background job of a non-interactive shell does, children inherit that, and Python then
    # never raises KeyboardInterrupt).
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--model", str(parrot_dir), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
            assert page.status == 200 and "monkeytune chat" in page.read().decode()
        proc.send_signal(signal.SIGINT)
        # communicate() drains both pipes while waiting, so a chatty shutdown cannot block the
        # child on a full pipe; Gradio's own shutdown joins its server thread with timeouts.
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(os.name == "nt", reason="uvloop does not build on Windows")
def test_the_api_runs_on_uvicorn_s_c_event_loop_and_http_parser():
    from types import SimpleNamespace

    from monkeytune.serve.api_launch import _uvicorn

    # The serve extra installs both and uvicorn picks them itself: with its pure-Python parser and
    # loop, refusals answered under load took longer (docs/serve.md, "Load benchmark").
    config = _uvicorn(SimpleNamespace(app=lambda scope, receive, send: None), "warning").config
    config.load()
    assert config.http_protocol_class.__module__ == "uvicorn.protocols.http.httptools_impl"
    assert config.get_loop_factory().__module__.startswith("uvloop")
