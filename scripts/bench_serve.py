"""``edgekv serve`` under load: N concurrent streaming clients vs the same N one at a time.

For each KV format an ``edgekv serve`` process is started on a free loopback port (the
bundled demo model unless --model). Every request is a chat completion with the same
system prompt of --system-tokens tokens (built from the model's own tokenizer) and its own
short question, streaming, --max-tokens new tokens (EOS ignored, greedy). A first request
(not measured) warms the server up and puts the system prompt in its prefix cache. For
each N in --clients, --rounds times: the N requests concurrently (one thread each), then
the same N one after another. Printed per format and N (medians over the rounds):

  agg tok/s      completion tokens of all N / wall time, concurrent
  seq tok/s      the same requests one at a time;  x seq: the ratio of the two
  TTFT p50/p95   time to the first text of a response, concurrent (ms)
  ITL p50        median gap between a response's text chunks after the first (ms)
  prefix hit     cached prompt tokens / system prompt tokens, every measured request
                 (usage.prompt_tokens_details.cached_tokens)
  KV B/tok, peak KV MiB   bytes per cached token; most KV in use during the run (/metrics)

    python scripts/bench_serve.py
    python scripts/bench_serve.py --formats int8 --clients 16 --max-tokens 32 --rounds 5

The clients run in this process, on the same machine as the server: by default plain
http.client and json; --client openai uses the openai library, whose typed objects cost
the shared CPUs about twice as much per token.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

QUESTIONS = ["What is the weather like today?", "Tell me a short story.",
             "Where does the river go?", "Who lives in the old house?",
             "Why is the sky blue?", "What did the fox say?", "How do boats float?",
             "When does the train leave?"]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def system_prompt(model: str | None, tokens: int) -> str:
    """Text of about ``tokens`` tokens for the model's tokenizer."""
    from transformers import AutoTokenizer

    from edgekv.llm import DEMO_MODEL_DIR

    tok = AutoTokenizer.from_pretrained(model or DEMO_MODEL_DIR)
    base = ("You are a helpful assistant in a small harbour town. You know the boats, the "
            "tides, the weather, the people and their stories, and you answer briefly. ")
    words, text = base.split(), ""
    i = 0
    while len(tok.encode(text, add_special_tokens=False)) < tokens:
        text += words[i % len(words)] + " "
        i += 1
    return text.strip()


class ServerProcess:
    def __init__(self, args, fmt: str):
        self.port = free_port()
        cmd = [sys.executable, "-c", "from edgekv.cli.main import main; main()", "serve",
               "--port", str(self.port),
               "--kv", fmt, "--kv-memory", args.kv_memory, "--dtype", args.dtype,
               "--max-num-seqs", str(max(args.clients)), "--served-model-name", "bench"]
        if args.model:
            cmd += ["--model", args.model]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"edgekv serve did not start:\n{self.proc.stdout.read()}")
            time.sleep(0.2)

    def metrics(self) -> dict:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            out = {}
            for line in r.read().decode().splitlines():
                if line and not line.startswith("#"):
                    name, value = line.rsplit(" ", 1)
                    out[name] = float(value)
            return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def one_request(client, system: str, question: str, max_tokens: int) -> dict:
    if isinstance(client, str):
        return one_request_http(client, system, question, max_tokens)
    t0 = time.perf_counter()
    times, usage = [], None
    stream = client.chat.completions.create(
        model="bench", messages=[{"role": "system", "content": system},
                                 {"role": "user", "content": question}],
        max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
    return {"start": t0, "times": times, "end": time.perf_counter(),
            "completion": usage.completion_tokens, "prompt": usage.prompt_tokens,
            "cached": usage.prompt_tokens_details.cached_tokens}


def one_request_http(url: str, system: str, question: str, max_tokens: int) -> dict:
    """As ``one_request``, over plain HTTP (http.client, json): a client that costs the
    shared CPUs less than the openai client's typed objects."""
    import http.client
    from urllib.parse import urlparse

    u = urlparse(url)
    body = json.dumps({"model": "bench", "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
        "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    times, usage = [], None
    for line in r:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        ch = chunk.get("choices")
        if ch and ch[0]["delta"].get("content"):
            times.append(time.perf_counter())
    conn.close()
    return {"start": t0, "times": times, "end": time.perf_counter(),
            "completion": usage["completion_tokens"], "prompt": usage["prompt_tokens"],
            "cached": usage["prompt_tokens_details"]["cached_tokens"]}


def measure(server: ServerProcess, client, system: str, sys_tokens: int, n: int,
            max_tokens: int, rounds: int) -> dict:
    """``rounds`` times: the n requests at once, then the same n one after another (so
    that the machine's load falls on both alike); medians of each."""
    qs = [QUESTIONS[i % len(QUESTIONS)] + f" ({i})" for i in range(n)]
    peak = [0.0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], server.metrics()["edgekv_kv_bytes_used"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    aggs, seqs, ttft, gaps, hits = [], [], [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            conc = list(pool.map(lambda q: one_request(client, system, q, max_tokens), qs))
        aggs.append(sum(r["completion"] for r in conc) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        seq = [one_request(client, system, q, max_tokens) for q in qs]
        seqs.append(sum(r["completion"] for r in seq) / (time.perf_counter() - t0))
        ttft += [(r["times"][0] - r["start"]) * 1e3 for r in conc if r["times"]]
        gaps += [(b - a) * 1e3 for r in conc for a, b in zip(r["times"], r["times"][1:],
                                                             strict=False)]
        hits += [r["cached"] / sys_tokens for r in conc + seq]
    done.set()
    watcher.join()
    ttft.sort()
    m = server.metrics()
    agg, seq_tps = statistics.median(aggs), statistics.median(seqs)
    return {"clients": n, "agg_tok_s": agg, "seq_tok_s": seq_tps, "ratio": agg / seq_tps,
            "ratios": [a / b for a, b in zip(aggs, seqs, strict=True)],
            "ttft_p50_ms": statistics.median(ttft),
            "ttft_p95_ms": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))],
            "itl_p50_ms": statistics.median(gaps) if gaps else None,
            "prefix_hit": min(1.0, statistics.mean(hits)) if hits else None,
            "kv_bytes_per_token": m["edgekv_kv_bytes_per_token"],
            "peak_kv_mib": peak[0] / 2**20}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF-format model dir (default: demo)")
    p.add_argument("--formats", default="fp16,int8,int4")
    p.add_argument("--clients", default="1,4,16,32")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--system-tokens", type=int, default=512)
    p.add_argument("--kv-memory", default="128MiB")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0,
                   help="the server's model threads (0: its default, one less than the CPUs)")
    p.add_argument("--client", choices=["http", "openai"], default="http",
                   help="the clients: plain HTTP (light), or the openai library (its typed "
                   "objects cost the shared CPUs ~2x more per token)")
    p.add_argument("--rounds", type=int, default=3,
                   help="concurrent and one-at-a-time runs alternate this many times; "
                   "medians are printed")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = p.parse_args(argv)
    a.clients = [int(x) for x in a.clients.split(",")]
    import openai
    from transformers import AutoTokenizer

    from edgekv.llm import DEMO_MODEL_DIR

    system = system_prompt(a.model, a.system_tokens)
    tok = AutoTokenizer.from_pretrained(a.model or DEMO_MODEL_DIR)
    sys_tokens = len(tok.encode(system, add_special_tokens=False))
    rows = []
    for fmt in a.formats.split(","):
        server = ServerProcess(a, fmt)
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none",
                                   max_retries=0, timeout=600) if a.client == "openai" \
                else server.url
            one_request(client, system, "warm up", 4)  # compiled kernels, first prefill
            for n in a.clients:
                r = measure(server, client, system, sys_tokens, n, a.max_tokens, a.rounds)
                r["format"] = fmt
                rows.append(r)
                print(f"{fmt} x{n}: {r['agg_tok_s']:.1f} tok/s concurrent, "
                      f"{r['seq_tok_s']:.1f} one at a time (ratios "
                      f"{', '.join(f'{x:.2f}' for x in r['ratios'])})", flush=True)
        finally:
            server.stop()
    load = os.getloadavg()[0]
    print(f"\n{a.model or 'demo model'}: system prompt {sys_tokens} tokens, "
          f"{a.max_tokens} new tokens per request, {a.dtype}, {a.client} clients, medians "
          f"of {a.rounds} rounds; load average {load:.2f} on {os.cpu_count()} CPUs")
    print("| KV | clients | agg tok/s | seq tok/s | x seq | TTFT p50 ms | TTFT p95 ms | "
          "ITL p50 ms | prefix hit | KV B/tok | peak KV MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        itl = f"{r['itl_p50_ms']:.1f}" if r["itl_p50_ms"] is not None else "-"
        hit = f"{100 * r['prefix_hit']:.0f}%" if r["prefix_hit"] is not None else "-"
        print(f"| {r['format']} | {r['clients']} | {r['agg_tok_s']:.1f} | "
              f"{r['seq_tok_s']:.1f} | {r['ratio']:.2f}x | {r['ttft_p50_ms']:.0f} | "
              f"{r['ttft_p95_ms']:.0f} | {itl} | {hit} | {r['kv_bytes_per_token']:,.0f} | "
              f"{r['peak_kv_mib']:.1f} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
