"""``python -m flashdec serve``'s HTTP server, driven by the official ``openai`` client: the
real server (uvicorn on a free port, in a thread) over the real engine and the default model
on the CPU. Greedy (temperature 0) runs are compared with each other: streamed against
non-streamed, concurrent against one by one; every error answers in OpenAI's shape with the
right status; a client that leaves mid-stream frees its slot."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

for _name in ("fastapi", "uvicorn", "openai", "httpx", "transformers", "torch"):
    pytest.importorskip(_name, reason=f"{_name} is not installed (the serve extra)")

import httpx  # noqa: E402
import openai  # noqa: E402
import uvicorn  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from flashdec import __main__ as cli  # noqa: E402
from flashdec.serve.engine import Engine, SamplingParams  # noqa: E402
from flashdec.serve.models import load_model  # noqa: E402
from flashdec.serve.server import create_app  # noqa: E402

MAX_TOKENS = 10
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
           "1, 2, 3, 4,", "The best way to learn a language is", "Water boils at"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def loaded():
    return load_model(None)


@pytest.fixture(scope="module")
def server(loaded):
    engine = Engine(loaded.model, loaded.tokenizer, attn="flashdec", max_batch=4, max_queue=16,
                    max_seq_len=512)
    engine.start()
    config = uvicorn.Config(create_app(engine, loaded.name), host="127.0.0.1", port=0,
                            log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        _wait(lambda: uv.started or not thread.is_alive(), 60, "the server to start")
        assert uv.started, "uvicorn did not start"
        port = uv.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        yield SimpleNamespace(url=url, engine=engine, name=loaded.name,
                              client=openai.OpenAI(base_url=f"{url}/v1", api_key="x",
                                                   max_retries=0, timeout=60))
    finally:
        uv.should_exit = True
        thread.join(30)
        engine.close()


def _chat(server, stream: bool = False, **kwargs):
    kwargs = {"messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0, **kwargs}
    return server.client.chat.completions.create(model=server.name, stream=stream, **kwargs)


def _complete(server, prompt: str, stream: bool = False, **kwargs):
    kwargs = {"max_tokens": MAX_TOKENS, "temperature": 0, **kwargs}
    return server.client.completions.create(model=server.name, prompt=prompt, stream=stream,
                                            **kwargs)


def _post(server, path: str, body, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, timeout=timeout,
                      headers={"Content-Type": "application/json"})


def _check_usage(usage) -> None:
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= MAX_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.fixture(scope="module")
def greedy(server):
    """Non-streamed greedy answers the tests compare with: chat to QUESTION, completion of
    PROMPTS[0] (MAX_TOKENS each)."""
    return SimpleNamespace(chat=_chat(server), completion=_complete(server, PROMPTS[0]))


# -- the endpoints ---------------------------------------------------------------------------
def test_health_and_models(server) -> None:
    response = httpx.get(f"{server.url}/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    models = server.client.models.list()
    assert [m.id for m in models.data] == [server.name]
    assert models.data[0].object == "model"
    assert server.client.models.retrieve(server.name).id == server.name


def test_chat(server, greedy) -> None:
    reply = greedy.chat
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == server.name and isinstance(reply.created, int)
    (choice,) = reply.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    _check_usage(reply.usage)
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == MAX_TOKENS
    # max_completion_tokens is chat's newer name for max_tokens
    shorter = _chat(server, max_tokens=None, max_completion_tokens=3)
    assert shorter.usage.completion_tokens <= 3
    assert choice.message.content.startswith(shorter.choices[0].message.content)


def test_completion(server, greedy) -> None:
    reply = greedy.completion
    assert reply.id.startswith("cmpl-") and reply.object == "text_completion"
    assert reply.model == server.name
    (choice,) = reply.choices
    assert isinstance(choice.text, str) and choice.text
    assert choice.finish_reason in ("stop", "length")
    _check_usage(reply.usage)


def test_streamed_chat_equals_non_streamed(server, greedy) -> None:
    whole = greedy.chat
    chunks = list(_chat(server, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *text_chunks, last = chunks
    assert last.choices == [] and last.usage == whole.usage  # the usage chunk
    assert text_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in text_chunks)
    assert text == whole.choices[0].message.content


def test_streamed_completion_equals_non_streamed(server, greedy) -> None:
    whole = greedy.completion
    chunks = list(_complete(server, PROMPTS[0], stream=True))  # no usage chunk unless asked
    assert all(c.object == "text_completion" and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_raw_stream_ends_with_done(server) -> None:
    body = {"model": server.name, "prompt": PROMPTS[2], "max_tokens": 4, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_concurrent_requests_equal_sequential(server) -> None:
    def run(i: int):
        if i % 2:
            reply = _chat(server, messages=[{"role": "user", "content": PROMPTS[i]}])
            return reply.choices[0].message.content, reply.choices[0].finish_reason
        reply = _complete(server, PROMPTS[i])
        return reply.choices[0].text, reply.choices[0].finish_reason

    one_by_one = [run(i) for i in range(len(PROMPTS))]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(run, range(len(PROMPTS))))
    assert together == one_by_one
    assert server.engine.active_count() == 0


def test_stop_sequences(server, greedy) -> None:
    text = greedy.completion.choices[0].text
    stripped = text.rstrip()
    assert len(stripped) >= 6, f"the greedy output is too short to cut: {text!r}"
    stop = stripped[len(stripped) // 2:][:3]  # a piece of the second half
    cut = text.find(stop)
    assert cut > 0
    reply = _complete(server, PROMPTS[0], stop=[stop, "\x00never"])
    assert reply.choices[0].text == text[:cut]
    assert reply.choices[0].finish_reason == "stop"
    # a single string works too, on chat as well
    chat_text = greedy.chat.choices[0].message.content
    stop = chat_text.rstrip()[-2:]
    reply = _chat(server, stop=stop)
    assert reply.choices[0].message.content == chat_text[:chat_text.find(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(server) -> None:
    first, second = (_complete(server, PROMPTS[2], temperature=1.0, seed=7,
                               max_tokens=6).choices[0].text for _ in range(2))
    assert first == second
    first, second = (_chat(server, temperature=1.0, top_p=0.9, seed=7,
                           max_tokens=6).choices[0].message.content for _ in range(2))
    assert first == second


# -- errors ----------------------------------------------------------------------------------
CHAT = {"messages": QUESTION, "max_tokens": 4}


@pytest.mark.parametrize("body, param", [
    ({**CHAT, "max_tokens": -1}, "max_tokens"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": []}, "messages"),
    ({"max_tokens": 4}, "messages"),
    ({**CHAT, "max_tokens": "4"}, "max_tokens"),
    ({**CHAT, "max_tokens": 4.5}, "max_tokens"),
    ({**CHAT, "temperature": "hot"}, "temperature"),
    ({**CHAT, "temperature": 2.5}, "temperature"),
    ({**CHAT, "top_p": 0}, "top_p"),
    ({**CHAT, "stream": "yes"}, "stream"),
    ({**CHAT, "seed": True}, "seed"),
    ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({**CHAT, "stop": 3}, "stop"),
    ({**CHAT, "n": 2}, "n"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ("{\"messages\": [", None),
    ("[1, 2]", None),
])
def test_bad_chat_request_is_400(server, body, param) -> None:
    response = _post(server, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "max_tokens": -5}, "max_tokens"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["one", "two"]}, "prompt"),
    ({"prompt": ""}, "prompt"),            # no tokens: the engine refuses it
    ({"prompt": "hi " * 600}, "prompt"),   # past max_seq_len (512)
    ({"prompt": [1, 2, 10 ** 9]}, "prompt"),
])
def test_bad_completion_request_is_400(server, body, param) -> None:
    response = _post(server, "/v1/completions", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_errors_through_the_client(server) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _chat(server, n=2)
    assert info.value.status_code == 400 and info.value.param == "n"
    with pytest.raises(openai.BadRequestError):
        _chat(server, max_tokens=-1)
    with pytest.raises(openai.NotFoundError) as info:
        server.client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=2)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert httpx.get(f"{server.url}/health").status_code == 200  # still serving


def test_unknown_fields_are_ignored(server) -> None:
    body = {"model": server.name, "prompt": "Hi", "max_tokens": 2, "temperature": 0,
            "frequency_penalty": 0.5, "user": "me", "something_new": {"nested": [1]}}
    response = _post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 2


def test_queue_full_is_503(loaded) -> None:
    # an engine that is not started: the request put in by hand stays, filling max_queue 1
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=1, max_queue=1, max_seq_len=64)
    try:
        engine.submit([1, 2, 3], SamplingParams(max_tokens=2), lambda event: None)
        with TestClient(create_app(engine, "m")) as http:
            client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0,
                                   http_client=http)
            with pytest.raises(openai.InternalServerError) as info:
                client.chat.completions.create(model="m", messages=QUESTION, max_tokens=2)
            assert info.value.status_code == 503 and info.value.code == "queue_full"
            assert info.value.response.headers["retry-after"]
            assert http.get("/health").status_code == 200
    finally:
        engine.close()


# -- clients that leave ----------------------------------------------------------------------
@pytest.fixture
def submitted(server, monkeypatch):
    """The engine requests the server submits during the test."""
    requests = []
    submit = server.engine.submit

    def spy(*args, **kwargs):
        requests.append(submit(*args, **kwargs))
        return requests[-1]

    monkeypatch.setattr(server.engine, "submit", spy)
    return requests


# a prompt the model goes on with, and room for ~480 tokens: seconds of work, cut short
LONG = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 480, "temperature": 0}


def test_disconnect_mid_stream_frees_the_slot(server, submitted) -> None:
    stream = _complete(server, stream=True, **LONG)
    first = next(iter(stream))
    assert first.choices[0].finish_reason is None
    stream.close()
    _wait(lambda: server.engine.active_count() == 0, 10, "the engine to drop the request")
    (request,) = submitted
    assert request.finished.reason == "cancelled"
    assert request.finished.completion_tokens < LONG["max_tokens"]


def test_disconnect_while_waiting_frees_the_slot(server, submitted) -> None:
    with pytest.raises(httpx.TimeoutException):  # the client gives up before the answer
        _post(server, "/v1/completions", LONG, timeout=0.5)
    _wait(lambda: server.engine.active_count() == 0, 10, "the engine to drop the request")
    (request,) = submitted
    assert request.finished.reason == "cancelled"


# -- the command line ------------------------------------------------------------------------
def test_serve_without_the_extra(monkeypatch, capsys) -> None:
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "fastapi" in err and 'pip install "flashdec[serve]"' in err


def test_serve_command(loaded, monkeypatch, capsys) -> None:
    """``serve`` loads the model, builds the engine, prints the URL once listening, serves,
    and closes the engine when uvicorn stops (here: told to exit; Ctrl-C does the same)."""
    from flashdec.serve import models

    asked, servers = [], []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: asked.append((a, k)) or loaded)
    startup = uvicorn.Server.startup

    async def recording_startup(self, sockets=None):
        servers.append(self)
        await startup(self, sockets)

    monkeypatch.setattr(uvicorn.Server, "startup", recording_startup)
    argv = ["serve", "--port", "0", "--device", "cpu", "--max-batch", "2", "--max-seq-len", "256"]
    status = []
    thread = threading.Thread(target=lambda: status.append(cli.main(argv)), daemon=True)
    thread.start()
    try:
        _wait(lambda: (servers and servers[0].started) or not thread.is_alive(), 60,
              "the server to start")
        assert asked == [((None,), {"device": "cpu", "dtype": None})]
        line = next(line for line in capsys.readouterr().out.splitlines() if " at http" in line)
        url = line.split(" at ")[1].split()[0]  # "flashdec: serving 'NAME' at URL (...)"
        assert url.endswith("/v1") and f"'{loaded.name}'" in line
        reply = openai.OpenAI(base_url=url, api_key="x", max_retries=0).completions.create(
            model=loaded.name, prompt="Hello", max_tokens=2, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        for server in servers:
            server.should_exit = True
        thread.join(30)
    assert status == [0]
    assert "flashdec: stopped" in capsys.readouterr().out
