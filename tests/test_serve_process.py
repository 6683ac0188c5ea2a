"""python -m jaxlm.serve as a process: 503 while it loads, what its log says, SIGTERM (no new connections, the
requests in flight finish, exit 0), and the command's own mistakes as one-line errors."""

import json
import socket
import sys

import httpx
import pytest
from helpers import run_py
from serve_helpers import serve_cache, start, tiny_model  # noqa: F401  (fixtures)

from jaxlm.cli import run_cli
from jaxlm.serve.cli import EXTRA, main

BODY = {"model": "tiny", "prompt": "Once", "max_tokens": 100, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}}  # fmt: skip


def test_503_while_loading_then_sigterm_finishes_what_is_in_flight(tiny_model, serve_cache, tmp_path):  # noqa: F811
    # the shapes of test_serve.py's server: its programs come from the session's compilation cache
    s = start(tiny_model, "--slots", 8, "--max-len", 128, "--model-name", "tiny", cache=serve_cache,
              log=tmp_path / "server.log", ready=False)  # fmt: skip
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            r = c.get("/health")
            assert r.status_code == 503 and r.json() == {"status": "loading"}
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": "Once"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and r.headers["retry-after"]
            s.wait_ready(300)
            log = s.text()
            assert (
                "compiled prefill[32] in" in log
                and "compiled step[rows=2] in" in log
                and "compiled step[rows=8] in" in log
            )
            assert "programs in" in log and "ready in" in log
            # three choices decoding in two streams; then SIGTERM
            with (
                c.stream("POST", "/v1/completions", json={**BODY, "n": 2}) as a,
                c.stream("POST", "/v1/completions", json=BODY) as b,
            ):
                lines_a, lines_b = a.iter_lines(), b.iter_lines()
                next(lines_a)
                s.proc.terminate()
                lines = [*lines_a, *lines_b]
            chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
            assert lines.count("data: [DONE]") == 2
            finished = [x["choices"][0]["finish_reason"] for x in chunks if x["choices"]]
            assert sorted(f for f in finished if f) == ["length"] * 3
            assert [x["usage"]["completion_tokens"] for x in chunks if not x["choices"]] == [200, 100]
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health", timeout=5)
        assert s.proc.wait(60) == 0, s.text()[-3000:]
        assert "Traceback" not in s.text()
    finally:
        s.stop(10)


def _error(capsys, *argv) -> str:
    assert run_cli(main, list(map(str, argv))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_the_commands_mistakes_are_one_line_errors(tiny_model, tmp_path, capsys, monkeypatch):  # noqa: F811
    assert "no such directory" in _error(capsys, tmp_path / "nothing")
    assert "--slots must be >= 1" in _error(capsys, tiny_model, "--slots", 0)
    assert "--max-len must be in 2..128" in _error(capsys, tiny_model, "--max-len", 4096)
    assert "--api-key is empty" in _error(capsys, tiny_model, "--api-key", " ")
    assert "cannot read it" in _error(capsys, tiny_model, "--chat-template", tmp_path / "missing.jinja")
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    assert "not a valid Jinja2 template" in _error(capsys, tiny_model, "--chat-template", tmp_path / "bad.jinja")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{port}" in _error(capsys, tiny_model, "--port", port)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the serve extra were not installed
    assert EXTRA in _error(capsys, tiny_model)
    assert "pip install 'jaxlm[serve]'" in EXTRA


def test_the_command_exits_2_on_a_bad_model(tmp_path):
    r = run_py("-m", "jaxlm.serve", str(tmp_path / "nothing"), timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
