"""``edgekv serve`` as users start it: the command, its engine in a process of its own
(edgekv/serve/process.py). Requests cross to the engine and back, a shared system prompt
is found in the prefix cache, a client that goes away frees its blocks, a dead engine is a
503 (not a hang), Ctrl-C stops both processes, a bad option is one line and exit code 2."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from edgekv import LLM, SamplingParams  # noqa: E402

KEY = "process-key"
NAME = "demo"
OPTS = ["--kv", "int8", "--kv-memory", "32MiB", "--dtype", "float32"]
SYSTEM = ("You are a helpful assistant in a small harbour town. You know the boats, the "
          "tides and the weather, and you answer briefly. ") * 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """``edgekv serve`` in a subprocess of its own session (Ctrl-C reaches it alone)."""

    def __init__(self, *extra: str):
        self.port = _free_port()
        self.out = tempfile.TemporaryFile("w+")  # files: nothing waits on a full pipe
        self.err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgekv.cli", "serve", "--port", str(self.port),
             "--api-key", KEY, "--served-model-name", NAME, *OPTS, *extra],
            stdout=self.out, stderr=self.err, text=True, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0,
                                    timeout=120)
        deadline = time.time() + 120
        while self.get("/health")[0] != 200:
            assert time.time() < deadline and self.proc.poll() is None, self.stderr()
            time.sleep(0.05)
        self.out.seek(0)
        self.banner = self.out.read()  # printed once the model is loaded

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {KEY}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metrics(self) -> dict:
        out = {}
        for line in self.get("/metrics")[1].splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def idle(self, timeout: float = 10.0) -> dict:
        deadline = time.time() + timeout
        while True:
            m = self.metrics()
            if m["edgekv_requests_running"] == 0 and m["edgekv_requests_waiting"] == 0:
                return m
            assert time.time() < deadline, m
            time.sleep(0.02)

    def engine_pid(self) -> int:
        """The engine process: the server's child started by multiprocessing's spawn."""
        for task in os.listdir(f"/proc/{self.proc.pid}/task"):
            with open(f"/proc/{self.proc.pid}/task/{task}/children") as f:
                for pid in f.read().split():
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as c:
                            cmd = c.read()
                    except FileNotFoundError:
                        continue
                    if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
                        return int(pid)
        raise AssertionError("no engine process")

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C as a terminal sends it, to the whole process group: (exit code,
        stderr)."""
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.proc.returncode, self.stderr()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _proc_children() -> bool:
    return os.path.exists(f"/proc/self/task/{os.getpid()}/children")


pytestmark = pytest.mark.skipif(not _proc_children(),
                                reason="finds the engine process through /proc")


@pytest.fixture(scope="module")
def served():
    s = Served()
    yield s
    s.kill()


@pytest.fixture(scope="module")
def ref():
    return LLM(kv_format="int8", kv_memory="32MiB", dtype="float32")


def test_the_command_answers_from_its_engine_process(served, ref):
    assert "API key required" in served.banner and NAME in served.banner
    assert served.engine_pid() != served.proc.pid
    prompt = "Once upon a time"
    want = ref.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0))[0]
    r = served.client.completions.create(model=NAME, prompt=prompt, max_tokens=24,
                                         temperature=0)
    assert r.choices[0].text == want.text
    assert r.usage.completion_tokens == len(want.token_ids)


def _chat(served, question: str) -> tuple[str, int]:
    """(streamed text, cached prompt tokens) of one chat request with the system prompt."""
    stream = served.client.chat.completions.create(
        model=NAME, messages=[{"role": "system", "content": SYSTEM},
                              {"role": "user", "content": question}],
        max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True})
    text, cached = "", None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
    return text, cached


def test_16_streams_sharing_a_system_prompt_equal_each_alone(served):
    """16 concurrent streams whose prompts share a system prompt (its blocks read once per
    step for all of them): each equals the same request alone, each found the system
    prompt in the prefix cache, and nothing is held after."""
    first, _ = _chat(served, "Who are you?")  # puts the system prompt in the prefix cache
    questions = [f"Question number {i}: where does the river go?" for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda q: _chat(served, q), questions))
    alone = [_chat(served, q) for q in questions]
    assert [t for t, _ in together] == [t for t, _ in alone]
    assert all(c >= 32 for _, c in together), [c for _, c in together]
    m = served.idle()
    assert m["edgekv_kv_blocks_used"] == 0
    assert m["edgekv_prefix_cache_hit_rate"] > 0.5


def test_a_client_gone_mid_stream_frees_its_blocks(served):
    served.idle()
    s = socket.create_connection(("127.0.0.1", served.port))
    body = json.dumps({"model": NAME, "prompt": "Far away", "max_tokens": 600,
                       "ignore_eos": True, "stream": True})
    s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}"
               f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               f"{body}").encode())
    s.settimeout(60)
    got = b""
    while got.count(b"data:") < 3:
        chunk = s.recv(4096)
        assert chunk, got
        got += chunk
    at_close = served.metrics()
    assert at_close["edgekv_kv_blocks_used"] > 0
    s.close()
    m = served.idle(timeout=5)
    assert m["edgekv_kv_blocks_used"] == 0
    # aborted within a few steps of the close, not after its 600 tokens
    after = m["edgekv_generation_tokens_total"] - at_close["edgekv_generation_tokens_total"]
    assert after < 100, after


def _gone(pid: int) -> bool:
    """No such process, or one that has exited (a zombie until it is reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_ctrl_c_stops_the_server_and_its_engine():
    """Ctrl-C reaches both processes (a terminal signals the group); the engine ignores
    it and the server stops it; no traceback, exit code 0."""
    s = Served()
    try:
        engine = s.engine_pid()
        code, err = s.interrupt()
        assert code == 0 and "Traceback" not in err, err
        deadline = time.time() + 10
        while not _gone(engine):
            assert time.time() < deadline, "the engine process outlived the server"
            time.sleep(0.05)
    finally:
        s.kill()


def test_a_dead_engine_is_a_503_and_the_server_still_answers():
    s = Served()
    try:
        os.kill(s.engine_pid(), signal.SIGKILL)
        deadline = time.time() + 10
        while s.get("/health")[0] != 503:
            assert time.time() < deadline, "health did not notice"
            time.sleep(0.05)
        status, got = s.post("/v1/completions", {"model": NAME, "prompt": "Hi",
                                                 "max_tokens": 2})
        assert status == 503 and got["error"]["code"] == "engine_stopped", got
        assert s.get("/metrics")[0] == 200  # the server itself still answers
        code, err = s.interrupt()
        assert code == 0 and "Traceback" not in err, err
    finally:
        s.kill()


def test_a_bad_model_path_is_one_line_and_exit_code_2():
    r = subprocess.run([sys.executable, "-m", "edgekv.cli", "serve", "--port",
                        str(_free_port()), "--model", "/nonexistent/model"],
                       capture_output=True, text=True, timeout=120)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert "/nonexistent/model" in err[0]
