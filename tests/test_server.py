"""The OpenAI-compatible server, against live servers on loopback started by the tests."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from clasp_decoding import generate, load

MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, model_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
        # The model is served under the name "tiny": a folder path is also a valid --model.
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, str(model_dir), str(self.port), *extra],
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

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# Start the real app under uvicorn, serving a local folder under the short name "tiny".
_LAUNCH = """
import sys
import uvicorn
from clasp_decoding.models import load
from clasp_decoding.server import create_app
model_dir, port, *extra = sys.argv[1:]
opts = dict(zip(extra[::2], extra[1::2]))
model, tok = load(model_dir, dtype="fp32")
app = create_app(model, tok, "tiny", max_queue=int(opts.get("--max-queue", 64)),
                 request_timeout=float(opts.get("--timeout", 120)), default_max_tokens=64)
uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")
"""


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    s = LiveServer(tiny_model_dir)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    """The same model in this process: what the library's generate says the answers are."""
    return load(str(tiny_model_dir), dtype="fp32")


def expected_chat(local, messages, n) -> str:
    model, tok = local
    return generate(model, tok, messages, max_new_tokens=n).text


# ----------------------------------------------------------------------------- the openai client


def test_openai_client_chat_and_completions(server, local):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
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
    r = httpx.post(
        server.url + "/v1/chat/completions",
        timeout=60,
        json={"model": MODEL, "messages": [{"role": "user", "content": "Recursion"}], "max_tokens": 20, "clasp": False},
    )
    body = r.json()
    assert r.status_code == 200 and body["clasp"]["method"] == "ar" and body["clasp"]["drafted"] == 0
    text = body["choices"][0]["message"]["content"]
    assert text == expected_chat(local, [{"role": "user", "content": "Recursion"}], 20)
    if len(text) > 6:
        stop = text[3:6]
        r = httpx.post(
            server.url + "/v1/chat/completions",
            timeout=60,
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "Recursion"}],
                "max_tokens": 20,
                "stop": stop,
            },
        )
        assert r.json()["choices"][0]["message"]["content"] == text[: text.find(stop)]
        assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_sampling_with_seed_is_reproducible(server):
    req = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 16,
        "temperature": 0.9,
        "top_p": 0.95,
        "seed": 7,
    }
    a = httpx.post(server.url + "/v1/chat/completions", json=req, timeout=60).json()
    b = httpx.post(server.url + "/v1/chat/completions", json=req, timeout=60).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


# ----------------------------------------------------------------------------- bad input

CHAT = "/v1/chat/completions"
OK_MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "path, body, status, needle",
    [
        (CHAT, b"{not json", 400, "not valid JSON"),
        (CHAT, b"[1, 2]", 400, "JSON object"),
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
        (CHAT, {"model": MODEL, "messages": OK_MSG, "n": 3}, 400, "Only n=1"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "clasp": {"method": "magic"}}, 400, "Unknown method 'magic'"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "clasp": {"num_skip": 99}}, 400, "num_skip=99"),
        (CHAT, {"model": MODEL, "messages": OK_MSG, "presence_penalty": 1.0}, 400, "presence_penalty"),
        ("/v1/completions", {"model": MODEL}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "empty"),
        ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "one prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, 400, "token ids"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ],
)
def test_bad_requests_get_openai_errors(server, path, body, status, needle):
    if isinstance(body, bytes):
        r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] or needle == err.get("param"), err
    assert set(err) == {"message", "type", "param", "code"}


def test_unknown_route_and_health(server):
    r = httpx.get(server.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


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
    """Valid, invalid and disconnecting clients at once, three rounds: every valid request gets exactly the
    output it gets alone, every invalid one its 4xx, the server stays healthy and its memory flat."""
    valid = [(p, 12 + 4 * (i % 5)) for i, p in enumerate(PROMPTS * 3)][:20]
    expected = {(p, n): expected_chat(local, [{"role": "user", "content": p}], n) for p, n in valid}
    url = server.url + CHAT
    figures = []

    async def one_round():
        async with httpx.AsyncClient(timeout=120) as client:
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
                    {"model": MODEL, "messages": [{"role": "user", "content": p}], "max_tokens": 60, "stream": True},
                    disconnect_after=2,
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
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert "clasp_requests_total" in metrics and 'status="cancelled"' in metrics
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


def test_queue_limit_and_timeout(tiny_model_dir):
    """A full queue answers 429 at once; a request past its time limit gets 504; neither hurts others."""
    s = LiveServer(tiny_model_dir, "--max-queue", "1", "--timeout", "0.4")
    try:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "A hash table maps keys"}],
            "max_tokens": 440,
            "clasp": False,
        }

        async def burst():
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*[client.post(s.url + CHAT, json=body) for _ in range(5)])

        codes = sorted(r.status_code for r in asyncio.run(burst()))
        assert 429 in codes and 504 in codes, codes
        busy = next(r for r in asyncio.run(burst()) if r.status_code == 429).json()["error"]
        assert busy["code"] == "queue_full" and "busy" in busy["message"]
        ok = httpx.post(s.url + CHAT, json={**body, "max_tokens": 4}, timeout=60)
        assert ok.status_code == 200
    finally:
        s.stop()
