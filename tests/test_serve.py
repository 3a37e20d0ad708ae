"""``edgekv serve`` with the real ``openai`` client, against a server on a free loopback port
(the bundled demo model, fp32, int8 KV): the endpoints, greedy output equal to
``LLM.generate``, usage counts, streaming, n, stop strings, every error case followed by
a request that works, 32 concurrent streams, a client killed mid-stream, backpressure."""

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from edgekv import LLM, SamplingParams  # noqa: E402
from edgekv.serve import create_app  # noqa: E402

KEY = "test-key"
NAME = "demo"
OPTS = dict(kv_format="int8", kv_memory="32MiB", dtype="float32", max_num_seqs=32)


class Server:
    """uvicorn running ``app`` in a thread on a free loopback port."""

    def __init__(self, app):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="error", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def request(self, method, path, body=None, key=KEY, raw=None):
        """(status, headers, decoded JSON or text) of one plain HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        text = r.read().decode()
        conn.close()
        try:
            return r.status, dict(r.getheaders()), json.loads(text)
        except ValueError:
            return r.status, dict(r.getheaders()), text

    def metrics(self) -> dict:
        _, _, text = self.request("GET", "/metrics")
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


@pytest.fixture(scope="module")
def llm():
    return LLM(**OPTS)


@pytest.fixture(scope="module")
def ref():
    """The same model and cache alone: what each request must equal."""
    return LLM(**OPTS)


@pytest.fixture(scope="module")
def server(llm):
    srv = Server(create_app(llm, NAME, api_key=KEY, max_live=64))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY,
                         max_retries=0, timeout=120)


def _greedy(ref, prompt, n):
    out = ref.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0))[0]
    return out.text, out.token_ids


def _idle(server, llm, timeout=10.0):
    """Wait until nothing runs, then check the engine (the loop thread is asleep)."""
    deadline = time.time() + timeout
    while True:
        m = server.metrics()
        if m["edgekv_requests_running"] == 0 and m["edgekv_requests_waiting"] == 0:
            break
        assert time.time() < deadline, m
        time.sleep(0.02)
    time.sleep(0.05)
    llm.check_integrity()
    return server.metrics()


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert server.request("GET", "/health", key=None)[:1] == (200,)


def test_completion_equals_generate(client, ref, llm):
    prompt = "The old lighthouse keeper"
    want_text, want_ids = _greedy(ref, prompt, 24)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
    assert r.choices[0].text == want_text
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode(prompt))
    assert r.usage.completion_tokens == len(want_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("length", "stop")


def test_streams_equal_whole_responses(client):
    kw = dict(model=NAME, max_tokens=20, temperature=0)
    whole = client.completions.create(prompt="Once upon a time", **kw)
    parts = list(client.completions.create(prompt="Once upon a time", stream=True, **kw))
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    msgs = [{"role": "system", "content": "You are brief."},
            {"role": "user", "content": "Tell me about the sea."}]
    chat = client.chat.completions.create(messages=msgs, **kw)
    stream = list(client.chat.completions.create(
        messages=msgs, stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert chat.choices[0].message.role == "assistant"
    assert text == chat.choices[0].message.content and text
    assert stream[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert stream[-1].usage.prompt_tokens == chat.usage.prompt_tokens


def test_n_seed_and_stop(client, ref):
    kw = dict(model=NAME, prompt="In the morning", max_tokens=16, temperature=0.9, seed=7)
    a = client.completions.create(n=2, **kw)
    b = client.completions.create(n=2, **kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded
    assert a.usage.completion_tokens == 32 or a.choices[0].finish_reason == "stop"
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(n=2, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[0], streamed[1]] == [c.text for c in a.choices]
    text, _ = _greedy(ref, "The old lighthouse keeper", 24)
    stop = text.strip().split()[2]
    r = client.completions.create(model=NAME, prompt="The old lighthouse keeper",
                                  max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_logprobs_equal_generates(client, ref):
    prompt = "The old lighthouse keeper"
    want = ref.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0,
                                                 logprobs=2))[0].outputs[0]
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([c for c, _ in want.logprobs], abs=1e-5)
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0 and all(len(d) <= 2 for d in lp.top_logprobs)
    kw = dict(model=NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=5,
              temperature=0, logprobs=True, top_logprobs=3)
    chat = client.chat.completions.create(**kw)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == c.logprob
               for c in content)
    streamed = [c for chunk in client.chat.completions.create(stream=True, **kw)
                for ch in chunk.choices if ch.logprobs for c in ch.logprobs.content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content])


def test_prefix_cache_counts_cached_tokens(client):
    system = "You answer questions about the weather in one short sentence. " * 8
    msgs = lambda q: [{"role": "system", "content": system},  # noqa: E731
                      {"role": "user", "content": q}]
    client.chat.completions.create(model=NAME, messages=msgs("Rain?"), max_tokens=2)
    r = client.chat.completions.create(model=NAME, messages=msgs("Snow?"), max_tokens=2)
    assert r.usage.prompt_tokens_details.cached_tokens >= 0.8 * r.usage.prompt_tokens - 16


@pytest.mark.parametrize("case", ["json", "no key", "wrong key", "model", "temperature",
                                  "context", "logprobs", "route", "empty", "ids"])
def test_errors_have_the_api_shape_and_the_server_goes_on(server, client, case):
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 2}
    key, raw, path = KEY, None, "/v1/completions"
    want = {"json": 400, "no key": 401, "wrong key": 401, "model": 404, "temperature": 400,
            "context": 400, "logprobs": 400, "route": 404, "empty": 400, "ids": 400}[case]
    if case == "json":
        raw = '{"model": "demo", "prompt": '
    elif case == "no key":
        key = None
    elif case == "wrong key":
        key = "nope"
    elif case == "model":
        body["model"] = "gpt-4"
    elif case == "temperature":
        body["temperature"] = -1
    elif case == "context":
        body["prompt"] = "word " * 5000
    elif case == "logprobs":
        body["logprobs"] = 9  # at most 5
    elif case == "route":
        path = "/v1/nothing"
    elif case == "empty":
        body["prompt"] = ""
    elif case == "ids":
        body["prompt"] = [5, 10**6]  # past the vocabulary
    status, _, got = server.request("POST", path, body, key=key, raw=raw)
    assert status == want, got
    assert set(got["error"]) == {"message", "type", "param", "code"} and got["error"]["message"]
    if case in ("temperature", "logprobs"):
        assert got["error"]["param"] == case
    if case == "context":
        assert got["error"]["code"] == "context_length_exceeded"
    if case == "model":
        assert got["error"]["code"] == "model_not_found"
    r = client.completions.create(model=NAME, prompt="Hello", max_tokens=2)
    assert r.choices[0].text is not None


def test_32_concurrent_streams_equal_requests_alone(server, client, ref, llm):
    prompts = [f"Story number {i}: the" for i in range(32)]
    want = [_greedy(ref, p, 12)[0] for p in prompts]

    def one(p):
        chunks = client.completions.create(model=NAME, prompt=p, max_tokens=12,
                                           temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, prompts))
    assert got == want
    m = _idle(server, llm)
    assert m["edgekv_kv_blocks_used"] == 0  # nothing leaked
    assert server.server.config.app.state.server.loop._accepted == 0
    assert m["edgekv_generation_tokens_total"] >= 32 * 12 - 32


def test_an_engine_failure_is_a_500_and_the_server_goes_on(server, client, llm,
                                                          monkeypatch):
    real, calls = llm.engine.step, []

    def failing():
        calls.append(1)
        if len(calls) == 2:  # the prompt's step passed; a decode step raises
            raise RuntimeError("injected")
        return real()

    monkeypatch.setattr(llm.engine, "step", failing)
    status, _, got = server.request("POST", "/v1/completions",
                                    {"model": NAME, "prompt": "Hello", "max_tokens": 8})
    assert status == 500 and got["error"]["type"] == "server_error", got
    assert "Traceback" not in got["error"]["message"]
    monkeypatch.setattr(llm.engine, "step", real)
    m = _idle(server, llm)  # rolled back and aborted: nothing held
    assert m["edgekv_kv_blocks_used"] == 0
    assert server.server.config.app.state.server.loop._accepted == 0  # no slot leaked
    for _ in range(3):  # the live count went back down: requests keep being taken
        r = client.completions.create(model=NAME, prompt="Hello", max_tokens=2)
        assert r.choices[0].text is not None


def test_a_client_killed_mid_stream_frees_its_blocks(server, llm):
    before = _idle(server, llm)
    s = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps({"model": NAME, "prompt": "Far away", "max_tokens": 600,
                       "temperature": 0, "ignore_eos": True, "stream": True})
    s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               f"{body}").encode())
    got = b""
    while got.count(b"data:") < 3:
        got += s.recv(4096)
    at_close = server.metrics()
    assert at_close["edgekv_kv_blocks_used"] > 0
    s.close()
    m = _idle(server, llm, timeout=5)
    assert m["edgekv_kv_blocks_used"] == 0
    after = m["edgekv_generation_tokens_total"] - at_close["edgekv_generation_tokens_total"]
    assert after <= 32  # a few steps at most (one, once the server has seen the close)
    assert m["edgekv_generation_tokens_total"] - before["edgekv_generation_tokens_total"] < 100


def test_past_the_limit_a_request_gets_429(llm):
    srv = Server(create_app(llm, NAME, max_live=1))
    try:
        s = socket.create_connection(("127.0.0.1", srv.port))
        body = json.dumps({"model": NAME, "prompt": "Far away", "max_tokens": 400,
                           "ignore_eos": True, "stream": True})
        s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                   f"application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
        while b"data:" not in s.recv(4096):
            pass
        status, headers, got = srv.request("POST", "/v1/completions",
                                           {"model": NAME, "prompt": "Hi", "max_tokens": 2},
                                           key=None)
        assert status == 429 and headers.get("retry-after") == "1", got
        assert got["error"]["type"] == "rate_limit_error"
        s.close()
        deadline = time.time() + 10
        while True:
            status, _, got = srv.request("POST", "/v1/completions",
                                         {"model": NAME, "prompt": "Hi", "max_tokens": 2},
                                         key=None)
            if status == 200 or time.time() > deadline:
                break
            time.sleep(0.05)
        assert status == 200, got
    finally:
        srv.stop()


def test_serve_on_a_port_in_use_is_one_line_before_the_model_loads():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t = time.time()
        r = subprocess.run([sys.executable, "-m", "edgekv.cli", "serve", "--port", str(port)],
                           capture_output=True, timeout=120)
    err = [ln for ln in r.stderr.decode().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert f"127.0.0.1:{port} is in use" in err[0]
    assert time.time() - t < 20  # the model was not loaded first


def test_a_loop_that_fails_itself_stops_taking_requests_and_tells_the_waiting():
    """A bug in the loop thread (not an engine step, which is rolled back and failed per
    request): every request it held hears Stopped (a 503), later ones are refused, the
    crash hook runs (the engine process exits on it, so the server sees it gone)."""
    from edgekv.serve.loop import EngineLoop, Request, Stopped

    class Recorded(Request):
        def __init__(self, *a):
            super().__init__(*a)
            self.events = []

        def _post(self, event):
            self.events.append(event)

    crashed = threading.Event()

    def on_step():
        raise RuntimeError("a bug in the loop")

    llm = LLM(**OPTS)
    loop = EngineLoop(llm, 4, on_step=on_step, on_crash=crashed.set)
    job = Recorded([5, 6, 7], SamplingParams(max_tokens=50))
    loop.submit(job)
    loop.start()
    assert crashed.wait(30)
    # its first step's text, then Stopped: never left waiting
    assert isinstance(job.events[-1].error, Stopped) and job.finished
    assert not any(e.done for e in job.events[:-1])
    assert not loop.alive()
    with pytest.raises(Stopped):
        loop.submit(Recorded([5], SamplingParams(max_tokens=1)))
    assert loop._accepted == 0
