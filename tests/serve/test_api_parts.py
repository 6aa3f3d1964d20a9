"""The API's parts without a server: request checks, prompt rendering, the batcher, the command line."""

from __future__ import annotations

import base64
import socket
import threading

import pytest

from monkeytune.cli import main
from monkeytune.generate import ChatSession, GenerationSettings
from monkeytune.serve.api_errors import APIError
from monkeytune.serve.api_inputs import render_prompt
from monkeytune.serve.api_request import RequestLimits, parse_chat_request
from monkeytune.serve.batching import Batcher, Job


def parse(messages, limits=RequestLimits(), **fields):
    return parse_chat_request({"model": "m", "messages": messages, **fields}, limits)


def refused(messages, limits=RequestLimits(), **fields) -> APIError:
    with pytest.raises(APIError) as caught:
        parse(messages, limits, **fields)
    return caught.value


def test_fields_and_their_defaults():
    req = parse([{"role": "developer", "content": "be brief"}, {"role": "user", "content": "a"},
                 {"role": "user", "content": [{"type": "text", "text": "b"}]}],
                max_tokens=5, max_completion_tokens=7, stop="\n", seed=3)
    assert [(m.role, m.text) for m in req.messages] == [("system", "be brief"), ("user", "a\nb")]
    assert (req.max_tokens, req.stop, req.seed, req.temperature, req.stream) == (7, ["\n"], 3, 0.0, False)
    assert parse([{"role": "user", "content": "a"}], temperature=0.7, top_p=0).temperature == 0.0  # top_p 0: greedy
    assert parse([{"role": "user", "content": "a"}], stream=True, stream_options={"include_usage": True}).include_usage


@pytest.mark.parametrize("messages, fields, param", [
    ([], {}, "messages"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], {}, "messages[1].role"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}], {},
     "messages[1].role"),
    ([{"role": "tool", "content": "a"}], {}, "messages[0].role"),
    ([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
      {"role": "user", "content": "a"}], {}, "messages[0].content[0].type"),
    ([{"role": "user", "content": "a"}], {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ([{"role": "user", "content": "a"}], {"seed": True}, "seed"),
    ([{"role": "user", "content": "a"}], {"max_tokens": 0}, "max_tokens"),
    ([{"role": "user", "content": "a"}], {"top_p": float("nan")}, "top_p"),
    ([{"role": "user", "content": "a"}], {"logprobs": True}, "logprobs"),
    ([{"role": "user", "content": "a"}], {"response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_fields_are_named(messages, fields, param):
    error = refused(messages, **fields)
    assert error.status == 400 and error.param == param, error.message


def test_image_urls(tmp_path, picture):
    url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    part = {"type": "image_url", "image_url": {"url": url}}
    assert parse([{"role": "user", "content": [part]}]).images[0].data == picture.read_bytes()
    small = RequestLimits(max_image_bytes=100)
    assert refused([{"role": "user", "content": [part]}], small).status == 413
    assert refused([{"role": "user", "content": [part] * 9}]).code == "too_many_images"
    # file:// URLs only with an image root, and only inside it (symlinks followed first).
    root = tmp_path / "root"
    root.mkdir()
    (root / "in.png").write_bytes(picture.read_bytes())
    (root / "escape.png").symlink_to(picture)
    rooted = RequestLimits(image_root=root)

    def file_part(url):
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]

    assert parse(file_part(f"file://{root}/in.png"), rooted).images[0].path == (root / "in.png").resolve()
    assert parse(file_part("file:in.png"), rooted).images[0].path == (root / "in.png").resolve()
    for url in ("file:///etc/hostname", f"file://{root}/../{picture.name}", f"file://{root}/escape.png",
                f"file://{root}/missing.png", "file://otherhost/in.png"):
        assert refused(file_part(url), rooted).code == "invalid_image_url", url
    assert refused(file_part(f"file://{root}/in.png")).code == "file_urls_disabled"


def test_chatml_conversations_render_as_chat_renders_them(engine, picture):
    from monkeytune.generate import prompt_ids

    model, tok = engine.model, engine.tokenizer
    session = ChatSession(model, tok, "chatml", str(picture), GenerationSettings(8), system="be brief")
    first = session.ask("what is it?")
    # What the session's second question is asked with: its history, the image in the first turn.
    expected = prompt_ids("chatml", tok, model.config.tokens_per_image, "and its colour?", None, session.history,
                          "be brief")
    req = parse([{"role": "system", "content": "be brief"},
                 {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                                              {"type": "text", "text": "what is it?"}]},
                 {"role": "assistant", "content": first}, {"role": "user", "content": "and its colour?"}])
    assert render_prompt(req, "chatml", tok, model.config, 8, [str(picture)]) == expected
    # Two pictures in one turn are numbered; a single-image layout refuses them.
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    two = parse([{"role": "user", "content": [image, image]}])
    ids, paths = render_prompt(two, "chatml", tok, model.config, 8, ["a.png", "b.png"])
    assert paths == ["a.png", "b.png"] and "Picture 2:" in tok.decode(ids)
    with pytest.raises(APIError, match="one image per user message"):
        render_prompt(two, "vqa", tok, model.config, 8, ["a.png", "b.png"])


def run_jobs(engine, jobs):
    """Queue ``jobs`` before the worker looks, so they form batches together; returns the batch sizes."""
    batcher = Batcher(engine.model, engine.tokenizer, "vqa", max_batch_size=8)
    done = threading.Semaphore(0)
    events = {id(j): [] for j in jobs}
    for job in jobs:
        job.on_event = lambda ev, j=job: (events[id(j)].append(ev), ev[0] == "done" and done.release())
    with batcher._cond:  # the worker waits for this lock: everything is queued when it looks
        for job in jobs:
            batcher._waiting.append(job)
        batcher._cond.notify()
    for _ in jobs:
        assert done.acquire(timeout=30)
    batcher.close()
    return list(batcher.recent), events


def prompt(engine, text="what?"):
    from monkeytune.generate import prompt_ids

    return prompt_ids("vqa", engine.tokenizer, engine.model.config.tokens_per_image, text)[0]


def test_batches_keep_each_request_s_own_limits(engine, answer):
    ids = prompt(engine)
    jobs = [Job(ids, [], 32, None), Job(ids, [], 20, None), Job(ids, [], 32, None, stop=["square"], stream=True),
            Job(ids, [], 32, None, stop=["left", "on"]), Job(ids, [], 2, None),
            Job(ids, [], 32, None, temperature=0.5, seed=1), Job(ids, [], 32, None, temperature=0.5, seed=1)]
    steps, events = run_jobs(engine, jobs)
    # Every request shares the batch whatever its budget and sampling; each row leaves when it ends.
    assert steps[0] == 7 and steps[1] == 7 and steps[2] == 6 and steps[-1] < 7
    assert [j.text for j in jobs[:5]] == [answer, answer, "a red", "a red square", "a red"]
    assert [j.finish_reason for j in jobs[:5]] == ["stop", "stop", "stop", "stop", "length"]
    streamed = [ev[1] for ev in events[id(jobs[2])] if ev[0] == "text"]
    assert "".join(streamed) == "a red", "text streams without the stop string"
    assert jobs[5].text == jobs[6].text  # the same seed samples the same answer


def test_a_cancelled_waiting_job_never_runs(engine):
    batcher = Batcher(engine.model, engine.tokenizer, "vqa", max_queue=1)
    seen = []
    with batcher._cond:  # hold the worker off while the queue is used
        job = Job(prompt(engine), [], 4, seen.append)
        batcher._waiting.append(job)
        with pytest.raises(Exception, match="already waiting"):
            batcher.submit(Job([1], [], 1, seen.append))
    batcher.cancel(job)
    batcher.close()
    assert job.finish_reason == "cancelled" and not job.tokens and seen == [("done", job)]


def test_the_command_refuses_bad_options_in_one_line(capsys, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["api", "--model", str(tmp_path), "--port", str(port)]) == 2
    assert "Address already in use" in capsys.readouterr().err
    for args, message in [(["--batch-size", "0"], "--batch-size must be at least 1"),
                          (["--image-root", str(tmp_path / "none")], "not a folder"),
                          (["--time-limit", "0"], "--time-limit must be above 0")]:
        assert main(["api", "--model", str(tmp_path), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["api", "--model", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "monkeytune api:" in capsys.readouterr().err


def test_a_failing_batch_reports_to_its_requests_and_the_worker_lives_on(engine, answer, tmp_path):
    ids = prompt(engine)
    broken = Job(ids + [engine.tokenizer.image_start_id], [str(tmp_path / "gone.png")], 8, None)
    batches, events = run_jobs(engine, [broken])
    assert broken.finish_reason == "error" and broken.error is not None
    fine = Job(ids, [], 32, None)
    run_jobs(engine, [fine])
    assert fine.text == answer


def test_the_command_loads_the_folder_and_serves_it(parrot_dir, monkeypatch, capsys, tmp_path):
    import monkeytune.serve.api_launch as launch

    served = {}

    def fake_serve_forever(server, sock, log_level):  # records what would be served, then "Ctrl-C"
        served.update(server=server, address=sock.getsockname(), log_level=log_level)
        server.close()
        sock.close()

    monkeypatch.setattr(launch, "serve_forever", fake_serve_forever)
    monkeypatch.setenv("MONKEYTUNE_API_KEY", "from-env")
    args = ["api", "--model", str(parrot_dir), "--port", "0", "--batch-size", "3", "--name", "parrot",
            "--prompt-template", "chatml", "--image-root", str(tmp_path), "--max-image-mb", "1", "--log-level", "info"]
    assert main(args) == 0
    settings = served["server"].settings
    assert (settings.model_name, settings.template, settings.api_key, settings.max_batch_size) == \
        ("parrot", "chatml", "from-env", 3)
    assert settings.limits.image_root == tmp_path and settings.limits.max_image_bytes == 2**20
    assert served["log_level"] == "info" and served["address"][0] == "127.0.0.1"
    out = capsys.readouterr().out
    assert f"on http://127.0.0.1:{served['address'][1]}/v1" in out and "template chatml" in out


def test_official_rotary_scales_are_not_mixed_in_a_batch(engine):
    # An official checkpoint with seq_length 23 scales rotary positions by its batch's longest
    # prompt above 23 tokens (dynamic NTK): only prompts of one scale may share a batch.
    from monkeytune.model.qwen_compat import ntk_alpha

    batcher = Batcher(engine.model, engine.tokenizer, "vqa")
    batcher._ntk_length = 23
    short, longer, long = Job([1] * 10, [], 4, None), Job([1] * 20, [], 4, None), Job([1] * 89, [], 4, None)
    assert ntk_alpha(10, 23) == ntk_alpha(20, 23) == 1 and ntk_alpha(89, 23) == 7
    with batcher._cond:
        batcher._waiting += [short, long, longer]
        assert batcher._take(None) == [short, longer] and batcher._take(None) == [long]
        # Beside a running batch, no one joins past a job of another scale (it would wait for ever).
        running = batcher.decoder.start([short])
        batcher._waiting += [long, longer]
        assert batcher._take(running) == [] and batcher.waiting == 2
        batcher._waiting.reverse()
        assert batcher._take(running) == [longer]
        batcher._waiting.clear()
    batcher.close()
