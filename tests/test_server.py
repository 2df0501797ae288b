"""The OpenAI-compatible server, against live servers on loopback started by the tests.

The main server requires an API key (so every test, the load test included, runs with authentication
on); each bad input of the security review has its case here.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from clasp_decoding import generate, load

MODEL = "tiny"
KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``create_app`` under uvicorn in a subprocess, serving a local folder under the name "tiny"."""

    def __init__(self, model_dir: Path, **settings) -> None:
        import tempfile

        # a suffix index of its own, not the one kept in the user's cache by earlier runs
        self._scratch = tempfile.mkdtemp(prefix="clasp-suffix-")
        settings.setdefault("suffix_file", str(Path(self._scratch) / "index.pt"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {settings['api_key']}"} if settings.get("api_key") else {}
        env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, str(model_dir), str(self.port), json.dumps(settings)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("server did not start in time")

    def post(self, path: str, body, **kw) -> httpx.Response:
        """POST ``body`` as JSON with ASCII escapes (so lone surrogates travel as JSON allows)."""
        headers = {**self.headers, "content-type": "application/json"}
        return httpx.post(
            self.url + path, content=json.dumps(body).encode(), headers=headers, timeout=kw.pop("timeout", 60)
        )

    def metric(self, name: str, **labels) -> float:
        """The value of one Prometheus sample (0 if absent)."""
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10).text
        for line in text.splitlines():
            if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        import shutil

        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self._scratch, ignore_errors=True)


_LAUNCH = """
import json, sys
import uvicorn
from clasp_decoding.models import load
from clasp_decoding.server import ServerSettings, create_app
model_dir, port, settings = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
model, tok = load(model_dir, dtype="fp32")
settings.setdefault("default_max_tokens", 64)
app = create_app(model, tok, "tiny", ServerSettings(**settings))
from clasp_decoding.server import install_drain
server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5))
install_drain(server, app)  # as `clasp serve` does
server.run()
"""


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    s = LiveServer(tiny_model_dir, api_key=KEY, max_body_bytes=2 << 20, request_timeout=120)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    """The same model in this process: what the library's generate says the answers are."""
    return load(str(tiny_model_dir), dtype="fp32")


def expected_chat(local, messages, n, **kw) -> str:
    model, tok = local
    return generate(model, tok, messages, max_new_tokens=n, **kw).text


CHAT = "/v1/chat/completions"
OK_MSG = [{"role": "user", "content": "hi"}]


# ----------------------------------------------------------------------------- the openai client


def test_openai_client_chat_and_completions(server, local):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == [MODEL]
    messages = [{"role": "user", "content": "A hash table maps keys"}]
    want = expected_chat(local, messages, 24)
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    assert chat.choices[0].message.content == want
    assert chat.usage.completion_tokens > 0 and chat.choices[0].finish_reason in ("stop", "length")
    extra = chat.model_extra["clasp"]
    assert extra["method"] == "hybrid" and extra["mean_accepted_tokens"] >= 1.0

    pieces, finish, usage = [], None, None
    for ev in client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if ev.choices:
            pieces.append(ev.choices[0].delta.content or "")
            finish = ev.choices[0].finish_reason or finish
        if ev.usage:
            usage = ev.usage
    assert "".join(pieces) == want and finish in ("stop", "length")
    assert usage.completion_tokens == chat.usage.completion_tokens

    model, tok = local
    want_raw = generate(model, tok, "Recursion is", max_new_tokens=20, raw=True).text
    comp = client.completions.create(model=MODEL, prompt="Recursion is", max_tokens=20, temperature=0)
    assert comp.choices[0].text == want_raw
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="Recursion is", max_tokens=20, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == want_raw


def test_plain_decoding_switch_and_stop(server, local):
    msgs = [{"role": "user", "content": "Recursion"}]
    r = server.post(CHAT, {"model": MODEL, "messages": msgs, "max_tokens": 20, "clasp": False})
    body = r.json()
    assert r.status_code == 200 and body["clasp"]["method"] == "ar" and body["clasp"]["drafted"] == 0
    text = body["choices"][0]["message"]["content"]
    assert text == expected_chat(local, msgs, 20)
    if len(text) > 6:
        stop = text[3:6]
        r = server.post(CHAT, {"model": MODEL, "messages": msgs, "max_tokens": 20, "stop": stop})
        assert r.json()["choices"][0]["message"]["content"] == text[: text.find(stop)]
        assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_reproduces_with_other_requests_in_between(server, local):
    """A seed fixes the text whatever the server learned in between, and it is the text plain decoding
    (``ar``) and the library give for that seed."""
    req = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 24,
        "temperature": 0.9,
        "seed": 7,
    }
    a = server.post(CHAT, req).json()["choices"][0]["message"]["content"]
    for method in ("pld", "clasp", "hybrid"):  # other requests teach the server's shared estimates
        server.post(CHAT, {**req, "seed": None, "clasp": {"method": method}})
    b = server.post(CHAT, req).json()["choices"][0]["message"]["content"]
    plain = server.post(CHAT, {**req, "clasp": False}).json()["choices"][0]["message"]["content"]
    assert a == b == plain
    assert a == expected_chat(local, req["messages"], 24, temperature=0.9, seed=7)


# ----------------------------------------------------------------------------- who may talk to it


def test_api_key_is_required_on_v1_and_metrics_but_not_health(server):
    body = {"model": MODEL, "messages": OK_MSG, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY}):
        for method, path in (("POST", CHAT), ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/v1/nothing")):
            r = httpx.request(method, server.url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401, (headers, path, r.text)
            err = r.json()["error"]
            assert err["code"] == "invalid_api_key" and "API key" in err["message"]
            assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert server.post(CHAT, body).status_code == 200
    assert httpx.get(server.url + "/metrics", headers=AUTH, timeout=10).status_code == 200


@pytest.mark.parametrize(
    "host, ok",
    [
        ("evil.example.com", False),
        ("evil.example.com:8000", False),
        ("192.168.1.5", False),
        ("localhost", True),
        ("127.0.0.1:1234", True),
        ("[::1]:8000", True),
        ("app.localhost", True),
    ],
)
def test_host_header_must_be_loopback(server, host, ok):
    r = httpx.get(server.url + "/health", headers={"Host": host}, timeout=10)
    assert (r.status_code == 200) == ok, r.text
    if not ok:
        assert r.status_code == 421 and "DNS rebinding" in r.json()["error"]["message"]


def test_refuses_to_serve_beyond_loopback_without_a_key():
    from clasp_decoding.errors import ClaspError
    from clasp_decoding.server import check_bind

    with pytest.raises(ClaspError, match="--api-key .* --insecure-no-auth"):
        check_bind("0.0.0.0", None, False)
    check_bind("0.0.0.0", "k", False)
    check_bind("0.0.0.0", None, True)
    check_bind("127.0.0.1", None, False)
    out = subprocess.run(
        [sys.executable, "-m", "clasp_decoding", "serve", "--model", "none", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "CLASP_API_KEY"},
    )
    assert out.returncode == 2 and "Refusing to serve on 0.0.0.0 without an API key" in out.stderr


# ----------------------------------------------------------------------------- bad input

LONE = "\ud800"


@pytest.mark.parametrize(
    "path, body, status, needle",
    [
        (CHAT, b"{not json", 400, "not valid JSON"),
        (CHAT, b"\xff\xfe{}", 400, "not valid JSON"),
        (CHAT, b"[1, 2]", 400, "JSON object"),
        (
            CHAT,
            b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
            400,
            "temperature",
        ),
        (CHAT, {"model": MODEL}, 400, "messages"),
        (CHAT, {"messages": OK_MSG}, 400, "model"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "temperature": "hot"}, 400, "temperature"),
        (CHAT, {"model": MODEL, "messages": "hi"}, 400, "messages"),
        (CHAT, {"model": "gpt-9", "messages": OK_MSG}, 404, "The model 'gpt-9' does not exist"),
        (CHAT, {"model": MODEL, "messages": []}, 400, "messages"),
        (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "  "}]}, 400, "no text"),
        (CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        (
            CHAT,
            {"model": MODEL, "messages": [{"role": "user", "content": "hash " * 600}]},
            400,
            "maximum context length",
        ),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "max_tokens": -5}, 400, "max_tokens must be at least 1"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "max_tokens": 0}, 400, "max_tokens must be at least 1"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "max_tokens": 100000}, 400, "max_tokens can be at most"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "temperature": 2.5}, 400, "temperature must be between 0 and 2"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "top_p": 0}, 400, "top_p must be in (0, 1]"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "top_p": 1.5}, 400, "top_p must be in (0, 1]"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "top_k": -2}, 400, "top_k"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "n": 3}, 400, "Only n=1"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "stop": "x" * 300}, 400, "stop"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "presence_penalty": 1.0}, 400, "presence_penalty"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "top_logprobs": 3}, 400, "top_logprobs needs logprobs"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "logprobs": 3}, 400, "logprobs must be true or false"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": True}, 400, "logprobs must be an integer"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 50}, 400, "logprobs"),
        (
            CHAT,
            {"model": MODEL, "messages": OK_MSG, "clasp": {"draft_vocab": 12345}},
            400,
            "clasp.draft_vocab must be one of",
        ),
        (
            CHAT,
            b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}",
            400,
            "cannot be read",
        ),
        (
            CHAT,
            {"model": MODEL, "messages": OK_MSG, "frobnicate": 1},
            400,
            "Unrecognized request argument supplied: frobnicate",
        ),
        # Former 500s: lone surrogates, a seed beyond 64 bits, engine options of the wrong type.
        (CHAT, {"model": "tiny" + LONE, "messages": OK_MSG}, 400, "unpaired surrogate"),
        (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "a" + LONE}]}, 400, "unpaired surrogate"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "seed": 2**64}, 400, "seed must fit in a signed 64-bit integer"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "seed": 2**63}, 400, "seed must fit in a signed 64-bit integer"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "clasp": {"stop": 5}}, 400, "clasp.stop is not an engine option"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "clasp": {"stop": ["a"] * 50}}, 400, "clasp.stop"),
        (
            CHAT,
            {"model": MODEL, "messages": OK_MSG, "clasp": {"temperature": 50}},
            400,
            "clasp.temperature is not an engine option",
        ),
        (
            CHAT,
            {"model": MODEL, "messages": OK_MSG, "clasp": {"skip_layers": 3}},
            400,
            "clasp.skip_layers must be a list",
        ),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "clasp": {"skip_layers": [1, 99]}}, 400, "clasp.skip_layers"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "clasp": {"method": "magic"}}, 400, "clasp.method must be one of"),
        (
            CHAT,
            {"model": MODEL, "messages": OK_MSG, "clasp": {"num_skip": 99}},
            400,
            "clasp.num_skip must be an integer in [1, 5]",
        ),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "clasp": {"lookup_max_ngram": 600}}, 400, "clasp.lookup_max_ngram"),
        (
            CHAT,
            {"model": MODEL, "messages": OK_MSG, "clasp": {"max_draft_tokens": 10**6}},
            400,
            "clasp.max_draft_tokens",
        ),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "clasp": {"adaptive": "yes"}}, 400, "clasp.adaptive"),
        (
            CHAT,
            {"model": MODEL, "messages": OK_MSG, "clasp": {"draft_exit_threshold": True}},
            400,
            "clasp.draft_exit_threshold",
        ),
        (
            CHAT,
            {"model": MODEL, "messages": OK_MSG, "clasp": {"lookup_min_ngram": 5, "lookup_max_ngram": 3}},
            400,
            "lookup_min_ngram",
        ),
        # Fields this server does not implement.
        (CHAT, {"model": MODEL, "messages": OK_MSG, "logit_bias": {"5": 10}}, 400, "logit_bias is not supported"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "tools": [{"type": "function"}]}, 400, "tools is not supported"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "tool_choice": "required"}, 400, "tool_choice is not supported"),
        (
            CHAT,
            {"model": MODEL, "messages": OK_MSG, "response_format": {"type": "json_object"}},
            400,
            "response_format",
        ),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "functions": [{"name": "f"}]}, 400, "functions is not supported"),
        ("/v1/completions", {"model": MODEL}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "empty"),
        ("/v1/completions", {"model": MODEL, "prompt": "x" + LONE}, 400, "unpaired surrogate"),
        ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "one prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, 400, "token ids"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, 400, "echo"),
    ],
)
def test_bad_requests_get_openai_errors(server, path, body, status, needle):
    if isinstance(body, bytes):
        r = httpx.post(
            server.url + path, content=body, headers={**AUTH, "content-type": "application/json"}, timeout=30
        )
    else:
        r = server.post(path, body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] or needle == err.get("param"), err
    assert set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": 1e-300},  # below 1e-5: greedy
        {"seed": -1},  # int64 seeds are accepted (mapped to 64 unsigned bits)
        {"logit_bias": {}, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}},
        {"user": "someone", "metadata": {"a": "b"}, "store": False},
        {"clasp": {"method": "pld", "lookup_max_ngram": 8, "lookup_max_tokens": 64}},
        {"clasp": {"skip_layers": [1, 3], "method": "static", "max_draft_tokens": 32}},
    ],
)
def test_harmless_values_are_served(server, local, extra):
    r = server.post(CHAT, {"model": MODEL, "messages": OK_MSG, "max_tokens": 8, **extra})
    assert r.status_code == 200, r.text
    if extra.get("temperature") == 1e-300:
        assert r.json()["choices"][0]["message"]["content"] == expected_chat(local, OK_MSG, 8)


def test_body_limit_and_health_while_a_large_body_is_parsed(server):
    big = {"model": MODEL, "messages": [{"role": "user", "content": "hash table " * 240_000}]}  # 2.6 MB
    r = server.post(CHAT, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    # A declared size beyond the limit is refused before the body is read (raw socket: no client sends
    # a Content-Length it does not mean).
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        head = f"POST {CHAT} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\n"
        sock.sendall((head + f"Content-Type: application/json\r\nContent-Length: {50 << 20}\r\n\r\n").encode() + b"{")
        assert sock.recv(4096).split(b"\r\n", 1)[0].endswith(b"413 Request Entity Too Large")
    # 1.5 MB of text: parsed, templated and tokenized off the event loop, then refused (too long).
    large = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hash table maps " * 95_000}]}
    ).encode()
    headers = {**AUTH, "content-type": "application/json"}
    result = {}

    def send():  # the body is encoded beforehand: this process's own JSON work must not delay the polls
        result["r"] = httpx.post(server.url + CHAT, content=large, headers=headers, timeout=120)

    worker = threading.Thread(target=send)
    latencies = []
    with httpx.Client(timeout=10) as poll:  # one connection: the latency is the server's, not a handshake's
        assert poll.get(server.url + "/health").status_code == 200
        t_start = time.perf_counter()
        worker.start()
        time.sleep(0.05)
        while worker.is_alive() and len(latencies) < 100:
            t0 = time.perf_counter()
            assert poll.get(server.url + "/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.02)
    worker.join()
    took = time.perf_counter() - t_start
    assert result["r"].status_code == 400 and "maximum context length" in result["r"].text
    assert len(latencies) >= 3, f"the large request finished too fast ({took:.2f} s) to measure /health during it"
    # Work on the event loop would hold one poll for most of the request's time; off the loop every poll
    # is answered at once (the bound leaves room for a loaded machine's scheduling).
    assert statistics.median(latencies) < 0.1 and max(latencies) < max(0.25, took / 3), (took, latencies)


def test_unknown_route_and_health(server):
    r = httpx.get(server.url + "/v1/nothing", headers=AUTH, timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_lookup_index_memory_is_linear_in_the_prompt():
    """The prompt-lookup index of the longest prompt a request can send, with the largest n-gram length
    allowed (the library's ceiling, above the server's), stays under 4 KB per token."""
    import tracemalloc

    from clasp_decoding.config import CEILINGS
    from clasp_decoding.drafting.lookup import NgramIndex

    per_token = []
    for n in (2000, 4000):
        tokens = [hash((i * 7919) % 1000) % 5000 for i in range(n)]
        tracemalloc.start()
        index = NgramIndex(1, CEILINGS["lookup_max_ngram"])
        index.extend(tokens)
        size, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        per_token.append(size / n)
        del index
    assert max(per_token) < 4096, per_token
    assert per_token[1] < 1.3 * per_token[0]  # linear: the bytes per token do not grow with the prompt


# ----------------------------------------------------------------------------- load


async def _stream(client: httpx.AsyncClient, url: str, body: dict, disconnect_after: int | None = None):
    """Returns (status, text, seconds); with ``disconnect_after``, leaves after that many events."""
    t0 = time.perf_counter()
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, r.json(), time.perf_counter() - t0
        text, events, done = "", 0, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            events += 1
            obj = json.loads(data)
            if obj.get("choices"):
                text += obj["choices"][0]["delta"].get("content") or ""
            if disconnect_after is not None and events >= disconnect_after:
                return "left", text, time.perf_counter() - t0
        assert done
        return 200, text, time.perf_counter() - t0


PROMPTS = [
    "A hash table maps keys",
    "Recursion is",
    "def add(a, b):",
    "Translate: Guten Morgen",
    "The quick brown fox",
    "1 + 1 = 2, 2 * 3 =",
    "Café naïve",
    "Collisions are handled by",
]


@pytest.mark.slow
def test_load_32_concurrent_streaming_clients(server, local):
    """Valid, invalid and disconnecting clients at once, three rounds, with the API key on: every valid
    request gets exactly the output it gets alone, every invalid one its 4xx, the server stays healthy
    and its memory flat."""
    valid = [(p, 12 + 4 * (i % 5)) for i, p in enumerate(PROMPTS * 3)][:20]
    expected = {(p, n): expected_chat(local, [{"role": "user", "content": p}], n) for p, n in valid}
    url = server.url + CHAT
    figures = []
    left_before = server.metric("clasp_requests_total", endpoint=CHAT, status="499")

    async def one_round():
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:
            jobs = [
                _stream(
                    client,
                    url,
                    {"model": MODEL, "messages": [{"role": "user", "content": p}], "max_tokens": n, "stream": True},
                )
                for p, n in valid
            ]
            jobs += [_stream(client, url, {"model": MODEL, "messages": [], "stream": True}) for _ in range(3)]
            jobs += [
                _stream(client, url, {"model": MODEL, "messages": OK_MSG, "stream": True, "temperature": 9})
                for _ in range(3)
            ]
            jobs += [
                _stream(
                    client,
                    url,
                    {"model": MODEL, "messages": [{"role": "user", "content": p}], "max_tokens": 400, "stream": True},
                    disconnect_after=2,  # long enough that the server notices before it would finish
                )
                for p in PROMPTS[:6]
            ]
            return await asyncio.gather(*jobs)

    rss = []
    for _ in range(3):
        results = asyncio.run(one_round())
        assert len(results) == 32
        for (p, n), (status, text, _) in zip(valid, results[:20], strict=True):
            assert status == 200 and text == expected[(p, n)]
        for status, body, _ in results[20:26]:
            assert status == 400 and "error" in body
        assert all(status == "left" for status, _, _ in results[26:])
        assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"
        figures.append(sorted(s for _, _, s in results[:20]))
        time.sleep(0.5)
        rss.append(server.rss_mb())
    assert rss[-1] - rss[0] < 50, rss
    deadline = time.perf_counter() + 20
    while (
        time.perf_counter() < deadline
        and server.metric("clasp_requests_total", endpoint=CHAT, status="499") - left_before < 18
    ):
        time.sleep(0.1)
    assert server.metric("clasp_requests_total", endpoint=CHAT, status="499") - left_before == 18
    lat = [s for f in figures for s in f]
    report = {
        "clients_per_round": 32,
        "rounds": 3,
        "valid": 60,
        "invalid": 18,
        "disconnected": 18,
        "failures": 0,
        "p50_s": round(statistics.median(lat), 3),
        "p95_s": round(sorted(lat)[int(0.95 * len(lat)) - 1], 3),
        "rss_mb": [round(x, 1) for x in rss],
    }
    print("\nload test:", json.dumps(report))


# ----------------------------------------------------------------------------- time, cancellation, counting


@pytest.fixture(scope="module")
def small_server(tiny_model_dir):
    """One running request, one waiting slot and a 0.4 s time limit (nothing chosen by measurement, so a
    burst of five always gives one running, one waiting, three refused)."""
    s = LiveServer(tiny_model_dir, max_queue=1, max_batch=1, prefill_chunk=64, request_timeout=0.4)
    yield s
    s.stop()


LONG = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "A hash table maps keys"}],
    "max_tokens": 440,
    "clasp": False,
}


def _wait_idle(server, seconds=20.0) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        h = httpx.get(server.url + "/health", timeout=10).json()
        if not h["running"] and h["queue_length"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the engine did not become idle")


def test_queue_limit_timeout_and_single_counting(small_server):
    """A full queue answers 429 at once; a request past its time limit gets 504 at its deadline even while
    it waits behind another; each answer is counted exactly once in /metrics."""
    s = small_server
    _wait_idle(s)
    before = {
        code: s.metric("clasp_requests_total", endpoint=CHAT, status=code) for code in ("429", "504", "200", "400")
    }

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:

            async def one():
                t0 = time.perf_counter()
                r = await client.post(s.url + CHAT, json=LONG)
                return r, time.perf_counter() - t0

            return await asyncio.gather(*[one() for _ in range(5)])

    answers = asyncio.run(burst())
    codes = sorted(r.status_code for r, _ in answers)
    assert 429 in codes and 504 in codes and set(codes) <= {429, 504}, codes
    assert all(sec < 2.0 for r, sec in answers if r.status_code == 504), answers  # at the deadline, not later
    busy = next(r for r, _ in answers if r.status_code == 429).json()["error"]
    assert busy["code"] == "queue_full" and "busy" in busy["message"]
    _wait_idle(s)
    assert s.post(CHAT, {**LONG, "max_tokens": 4}).status_code == 200
    assert s.post(CHAT, {**LONG, "max_tokens": 0}).status_code == 400
    after = {code: s.metric("clasp_requests_total", endpoint=CHAT, status=code) for code in before}
    assert after["429"] - before["429"] == codes.count(429)
    assert after["504"] - before["504"] == codes.count(504)
    assert after["200"] - before["200"] == 1 and after["400"] - before["400"] == 1


def test_a_non_streamed_request_whose_client_leaves_is_cancelled(tiny_model_dir):
    s = LiveServer(tiny_model_dir, request_timeout=60)
    try:
        t0 = time.perf_counter()  # the whole generation, timed on this machine now
        assert s.post(CHAT, {**LONG, "max_tokens": 490}).json()["usage"]["completion_tokens"] == 490
        whole = time.perf_counter() - t0
        before = s.metric("clasp_requests_total", endpoint=CHAT, status="499")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + CHAT, json={**LONG, "max_tokens": 490}, timeout=whole / 8)
        t0 = time.perf_counter()
        _wait_idle(s, 10)  # the worker stopped at a round boundary instead of generating the rest
        assert time.perf_counter() - t0 < whole / 2, (time.perf_counter() - t0, whole)
        deadline = time.perf_counter() + 10
        while (
            time.perf_counter() < deadline and s.metric("clasp_requests_total", endpoint=CHAT, status="499") == before
        ):
            time.sleep(0.05)
        assert s.metric("clasp_requests_total", endpoint=CHAT, status="499") - before == 1
        assert s.post(CHAT, {**LONG, "max_tokens": 4}).status_code == 200
    finally:
        s.stop()


def test_sigterm_drains_every_request_in_flight_without_a_500(tiny_model_dir):
    """SIGTERM with requests in flight (two running, more queued): new requests get 503 shutting_down
    with Retry-After; those in flight finish within the drain timeout or end with an OpenAI shutting_down
    error (in a stream: an error event, then [DONE]); none gets a 500 or plain text; the process exits."""
    s = LiveServer(tiny_model_dir, request_timeout=120, max_batch=2, drain_timeout=1.5)
    streams: list[list[str]] = []
    plain: list[tuple[int, str]] = []

    def streamed(max_tokens):
        lines: list[str] = []
        streams.append(lines)
        try:
            with httpx.stream(
                "POST", s.url + CHAT, json={**LONG, "max_tokens": max_tokens, "stream": True}, timeout=30
            ) as r:
                lines.append(f"status {r.status_code} {r.headers.get('content-type')}")
                for line in r.iter_lines():
                    lines.append(line)
        except httpx.HTTPError as e:
            lines.append(f"closed: {type(e).__name__}")

    def whole():
        r = httpx.post(s.url + CHAT, json={**LONG, "max_tokens": 490}, timeout=30)
        plain.append((r.status_code, r.text))

    # The short stream goes first and is admitted (its first token arrived) before the others queue
    # behind it, so that it holds one of the two batch slots whatever the machine's speed.
    threads = [threading.Thread(target=streamed, args=(24,))]
    threads[0].start()
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline and not any(ln.startswith("data: ") for ln in (streams or [[]])[0]):
        time.sleep(0.01)
    threads += [threading.Thread(target=streamed, args=(490,)) for _ in range(5)]
    threads += [threading.Thread(target=whole) for _ in range(2)]
    for t in threads[1:]:
        t.start()

    def in_flight() -> int:
        h = httpx.get(s.url + "/health", timeout=10).json()
        return h["running"] + h["queue_length"]

    def short_done() -> bool:
        return "data: [DONE]" in streams[0]

    deadline = time.perf_counter() + 30  # every request is in the engine (the short one maybe done already)
    while time.perf_counter() < deadline and in_flight() < (7 if short_done() else 8):
        time.sleep(0.02)
    t0 = time.perf_counter()
    s.proc.send_signal(signal.SIGTERM)
    deadline = time.perf_counter() + 10
    while time.perf_counter() < deadline and httpx.get(s.url + "/health", timeout=10).status_code != 503:
        time.sleep(0.02)
    late = httpx.post(s.url + CHAT, json=LONG, timeout=10)
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    assert late.headers.get("retry-after")
    health = httpx.get(s.url + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "draining"
    s.proc.wait(timeout=20)
    took = time.perf_counter() - t0
    for t in threads:
        t.join(timeout=15)
    assert not any(t.is_alive() for t in threads)
    assert took < 10, took
    for lines in streams:
        assert lines and lines[0].startswith("status 200 text/event-stream"), lines[:3]
        data = [ln for ln in lines if ln.startswith("data: ")]
        assert data[-1] == "data: [DONE]", lines[-4:]
        last = json.loads(data[-2][6:])
        assert last.get("choices") or last["error"]["code"] == "shutting_down", last
    finished = sum(1 for lines in streams if '"finish_reason": "length"' in "".join(lines))
    assert finished >= 1  # the short one finished within the drain
    for status, text in plain:
        assert status in (200, 503), (status, text[:200])
        if status == 503:
            assert json.loads(text)["error"]["code"] == "shutting_down"
