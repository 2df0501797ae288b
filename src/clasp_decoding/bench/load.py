"""``clasp bench-serve``: the server under load, through HTTP as clients meet it.

The app runs in this process on a loopback port (uvicorn in a thread); streaming clients (httpx) send
OpenAI chat requests and time every server-sent event. Scenarios:

- ``clients``: for each method and each number of clients ``N``, ``N`` clients send one request each at
  the same moment (a different Spec-Bench question each). Aggregate tokens per second (all tokens over
  the wall time), each request's own rate, time to first token and inter-token latency percentiles; every
  response is checked against the same request alone.
- ``join``: ``N`` streams run; then a long prompt (about ``--join-tokens`` tokens) joins. The running
  streams' inter-token latency percentiles while it joins, with the server's chunked prefill and with the
  prompt prefilled whole, and the long request's time to first token.
- ``chat``: two-turn conversations (Spec-Bench's multi-turn questions): turn 2 (the whole conversation so
  far) with prefix reuse on and off; its time to first token, and whether the texts are identical.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class LocalServer:
    """The app on a free loopback port, in a thread, until :meth:`stop`."""

    def __init__(self, model, tokenizer, name: str, **settings) -> None:
        import socket

        import uvicorn

        from ..server import create_app

        self.app = create_app(model, tokenizer, name, **settings)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


async def stream_chat(client, url: str, name: str, messages: list[dict], max_tokens: int, method: str) -> dict:
    """One streamed chat request: time to first token, the gap before each later token (a gap over a
    multi-token event is shared by its tokens), the end, the text."""
    body = {
        "model": name, "messages": messages, "max_tokens": max_tokens, "stream": True, "temperature": 0,
        "clasp": {"method": method},
    }  # fmt: skip
    t0 = time.perf_counter()
    first, last, gaps, text, tokens, times = None, None, [], "", 0, []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            piece = event["choices"][0].get("delta", {}).get("content") if event.get("choices") else None
            if piece:
                now = time.perf_counter()
                times.append(now)
                if first is None:
                    first = now - t0
                elif last is not None:
                    gaps.append((now - last, piece))
                last = now
                text += piece
                tokens += 1
    return {"ttft": first if first is not None else time.perf_counter() - t0, "end": time.perf_counter() - t0,
            "gaps": gaps, "text": text, "events": tokens, "times": times, "start": t0}  # fmt: skip


def per_token_gaps(tokenizer, gaps: list[tuple[float, str]]) -> list[float]:
    """Each event's gap shared by the tokens it carried (a speculative round streams several at once)."""
    out = []
    for gap, piece in gaps:
        n = max(1, _tokens_of(tokenizer, piece))
        out.extend([gap / n] * n)
    return out


def _client():
    import httpx

    return httpx.AsyncClient(limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))


def _tokens_of(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def run_clients(server: LocalServer, tokenizer, prompts: list[str], max_tokens: int, method: str) -> dict:
    """Every prompt at once, streamed."""

    async def main():
        async with _client() as client:
            jobs = [
                stream_chat(client, server.url, server.name, [{"role": "user", "content": p}], max_tokens, method)
                for p in prompts
            ]
            return await asyncio.gather(*jobs)

    t0 = time.perf_counter()
    per = asyncio.run(main())
    wall = time.perf_counter() - t0
    counts = [_tokens_of(tokenizer, r["text"]) for r in per]
    gaps = [g for r in per for g in per_token_gaps(tokenizer, r["gaps"])]
    return {
        "clients": len(prompts),
        "aggregate_tps": sum(counts) / wall,
        "per_request_tps": statistics.mean(c / r["end"] for c, r in zip(counts, per, strict=True)),
        "ttft_p50": percentile([r["ttft"] for r in per], 50),
        "ttft_p99": percentile([r["ttft"] for r in per], 99),
        "itl_p50": percentile(gaps, 50),
        "itl_p90": percentile(gaps, 90),
        "itl_p99": percentile(gaps, 99),
        "texts": [r["text"] for r in per],
    }


def clients_scenario(model, tokenizer, name, prompts, clients, methods, max_tokens, settings, log) -> list[dict]:
    rows = []
    server = LocalServer(model, tokenizer, name, **{"suffix_index": "off", **settings})
    try:
        for method in methods:
            run_clients(server, tokenizer, prompts[:2], 8, method)  # warm-up (measures, quantizes once)
        for method in methods:
            alone = {}
            for n in clients:
                res = run_clients(server, tokenizer, prompts[:n], max_tokens, method)
                for i in range(n):  # every response against the same request alone (measured once)
                    if i not in alone:
                        alone[i] = (
                            res["texts"][0]
                            if n == 1
                            else run_clients(server, tokenizer, [prompts[i]], max_tokens, method)["texts"][0]
                        )
                same = sum(res["texts"][i] == alone[i] for i in range(n))
                row = {k: v for k, v in res.items() if k != "texts"}
                row.update(method=method, identical=f"{same}/{n}", max_batch=server.app.state.engine.max_batch)
                rows.append(row)
                log(
                    f"  {method} x{n}: {row['aggregate_tps']:.1f} tok/s aggregate, {row['per_request_tps']:.1f} per "
                    f"request, first token p50 {row['ttft_p50']:.2f} s, inter-token p50/p99 "
                    f"{row['itl_p50'] * 1e3:.0f}/{row['itl_p99'] * 1e3:.0f} ms, {row['identical']}"
                )
    finally:
        server.stop()
    return rows


def join_scenario(model, tokenizer, name, prompts, long_prompt, streams, max_tokens, settings, log) -> list[dict]:
    """``streams`` running streams, then ``long_prompt`` joins after their first tokens; with the
    server's chunked prefill and with the prompt prefilled whole."""
    rows = []
    for label, chunk in (("chunked prefill", settings.get("prefill_chunk")), ("whole prefill", 1 << 30)):
        server = LocalServer(model, tokenizer, name, **{**settings, "prefill_chunk": chunk, "prefix_cache": "off"})
        try:
            run_clients(server, tokenizer, prompts[:2], 8, "ar")  # warm-up

            async def main(server=server):
                async with _client() as client:
                    running = [
                        asyncio.ensure_future(
                            stream_chat(client, server.url, name, [{"role": "user", "content": p}], max_tokens, "ar")
                        )
                        for p in prompts[:streams]
                    ]
                    await asyncio.sleep(2.0)  # the streams are decoding
                    joined = time.perf_counter()
                    late = await stream_chat(
                        client, server.url, name, [{"role": "user", "content": long_prompt}], 8, "ar"
                    )
                    done = await asyncio.gather(*running)
                    return joined, joined + late["ttft"], late, done

            joined, prefilled, late, done = asyncio.run(main())
            during = [
                b - a
                for r in done
                for a, b in zip(r["times"], r["times"][1:], strict=False)
                if b >= joined and a <= prefilled
            ]
            steady = [
                b - a
                for r in done
                for a, b in zip(r["times"], r["times"][1:], strict=False)
                if a > prefilled or b < joined
            ]
            row = {
                "mode": label, "prefill_chunk": server.app.state.engine.batch.prefill_chunk, "streams": streams,
                "join_tokens": _tokens_of(tokenizer, long_prompt), "long_ttft": late["ttft"],
                "itl_p50": percentile(steady + during, 50), "itl_p99": percentile(steady + during, 99),
                "itl_max_during_join": max(during, default=float("nan")),
            }  # fmt: skip
            row["p99_over_p50"] = row["itl_p99"] / row["itl_p50"] if row["itl_p50"] else float("nan")
            rows.append(row)
            log(
                f"  join ({label}, chunk {row['prefill_chunk']}): inter-token p50 {row['itl_p50'] * 1e3:.0f} ms, p99 "
                f"{row['itl_p99'] * 1e3:.0f} ms ({row['p99_over_p50']:.2f}x), longest gap while joining "
                f"{row['itl_max_during_join'] * 1e3:.0f} ms; the long prompt's first token {row['long_ttft']:.2f} s"
            )
        finally:
            server.stop()
    return rows


def chat_scenario(model, tokenizer, name, conversations, max_tokens, settings, log) -> list[dict]:
    """Turn 1, then turn 2 with the whole conversation, per conversation; prefix reuse on, then off."""
    rows, texts = [], {}
    for mode in ("key", "off"):
        server = LocalServer(model, tokenizer, name, **{**settings, "prefix_cache": mode})
        try:
            run_clients(server, tokenizer, ["Hello."], 4, "hybrid")  # warm-up

            async def main(server=server):
                out = []
                async with _client() as client:
                    for turns in conversations:
                        history = [{"role": "user", "content": turns[0]}]
                        one = await stream_chat(client, server.url, name, history, max_tokens, "hybrid")
                        history += [
                            {"role": "assistant", "content": one["text"]},
                            {"role": "user", "content": turns[1]},
                        ]
                        two = await stream_chat(client, server.url, name, history, max_tokens, "hybrid")
                        out.append((one, two))
                return out

            res = asyncio.run(main())
            texts[mode] = [(a["text"], b["text"]) for a, b in res]
            row = {
                "prefix_cache": mode,
                "conversations": len(res),
                "turn2_ttft_mean": statistics.mean(b["ttft"] for _, b in res),
                "turn1_ttft_mean": statistics.mean(a["ttft"] for a, _ in res),
                "reused_tokens": server.app.state.engine.stats.reused_tokens,
                "prompt_tokens": server.app.state.engine.stats.prompt_tokens,
            }
            rows.append(row)
        finally:
            server.stop()
    same = sum(a == b for a, b in zip(texts["key"], texts["off"], strict=True))
    for row in rows:
        row["identical"] = f"{same}/{len(conversations)}"
    on, off = rows
    log(
        f"  chat: turn 2's first token {on['turn2_ttft_mean']:.2f} s with prefix reuse, {off['turn2_ttft_mean']:.2f} s "
        f"without ({on['turn2_ttft_mean'] / off['turn2_ttft_mean']:.2f}x); {on['reused_tokens']} of "
        f"{on['prompt_tokens']} prompt tokens reused; texts identical {on['identical']}"
    )
    return rows


def repeat_scenario(model, tokenizer, name, prompts, clients, max_tokens, settings, log) -> list[dict]:
    """``clients`` clients work through a repeating workload (each its share, one request after another),
    with the server's suffix index off and on; aggregate tokens per second, and whether the texts agree."""
    import tempfile

    rows, texts = [], {}
    scratch = tempfile.mkdtemp(prefix="clasp-suffix-")  # a fresh index: what this run learns, nothing older
    for mode in ("off", "key"):
        kept = f"{scratch}/index.pt"
        server = LocalServer(model, tokenizer, name, **{**settings, "suffix_index": mode, "suffix_file": kept})
        try:
            run_clients(server, tokenizer, ["Hello."], 4, "hybrid")  # warm-up

            async def main(server=server):
                async with _client() as client:

                    async def worker(mine):
                        out = []
                        for i in mine:
                            msgs = [{"role": "user", "content": prompts[i]}]
                            out.append((i, await stream_chat(client, server.url, name, msgs, max_tokens, "hybrid")))
                        return out

                    shares = [range(k, len(prompts), clients) for k in range(clients)]
                    return [x for part in await asyncio.gather(*(worker(s) for s in shares)) for x in part]

            t0 = time.perf_counter()
            res = asyncio.run(main())
            wall = time.perf_counter() - t0
            texts[mode] = {i: r["text"] for i, r in res}
            tokens = sum(_tokens_of(tokenizer, r["text"]) for _, r in res)
            engine = server.app.state.engine
            index = engine.suffix
            rows.append({
                "suffix_index": mode, "clients": clients, "requests": len(prompts), "aggregate_tps": tokens / wall,
                "steps": engine.stats.steps, "drafted": engine.stats.drafted, "accepted": engine.stats.accepted,
                "index_tokens": index.size if index is not None else 0,
                "index_mb": index.nbytes() / 2**20 if index is not None else 0.0,
            })  # fmt: skip
        finally:
            server.stop()
    same = sum(texts["off"][i] == texts["key"][i] for i in texts["off"])
    for row in rows:
        row["identical"] = f"{same}/{len(prompts)}"
    off, on = rows
    log(
        f"  repeat: {on['aggregate_tps']:.1f} tok/s aggregate with the suffix index, {off['aggregate_tps']:.1f} "
        f"without ({on['aggregate_tps'] / off['aggregate_tps']:.2f}x); index {on['index_tokens']} tokens, "
        f"{on['index_mb']:.1f} MB; texts identical {on['identical']}"
    )
    return rows


def markdown(result: dict, info: dict) -> str:
    lines = [
        f"# Load: {info['model']}",
        "",
        f"- {info['cpu']}, {info['threads']} threads, dtype {info['dtype']}, torch {info['torch']}; "
        f"{info['max_new_tokens']} new tokens per request, greedy, through HTTP (streaming); {info['date']}",
    ]
    rows = result.get("clients") or []
    if rows:
        lines += [
            "",
            "## Clients at once",
            "",
            "N clients send one request each at the same moment; aggregate = all tokens / wall time; "
            "inter-token latency = the gap before each streamed token.",
            "",
            "| method | clients | aggregate tok/s | x one client | per-request tok/s | first token p50 / p99 (s) "
            "| inter-token p50 / p90 / p99 (ms) | same as alone |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        one = {r["method"]: r for r in rows if r["clients"] == 1}
        for r in rows:
            base = one.get(r["method"])
            ratio = f"{r['aggregate_tps'] / base['aggregate_tps']:.2f}x" if base else "n/a"
            lines.append(
                f"| `{r['method']}` | {r['clients']} | {r['aggregate_tps']:.1f} | {ratio} | {r['per_request_tps']:.1f} "
                f"| {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | {r['itl_p50'] * 1e3:.0f} / {r['itl_p90'] * 1e3:.0f} / "
                f"{r['itl_p99'] * 1e3:.0f} | {r['identical']} |"
            )
    if result.get("join"):
        lines += [
            "",
            "## A long prompt joins running streams",
            "",
            "| prefill | chunk (tokens) | streams | prompt tokens | inter-token p50 (ms) | p99 (ms) | p99 / p50 "
            "| longest gap while joining (ms) | long prompt's first token (s) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in result["join"]:
            lines.append(
                f"| {r['mode']} | {r['prefill_chunk']} | {r['streams']} | {r['join_tokens']} | {r['itl_p50'] * 1e3:.0f} "
                f"| {r['itl_p99'] * 1e3:.0f} | {r['p99_over_p50']:.2f}x | {r['itl_max_during_join'] * 1e3:.0f} "
                f"| {r['long_ttft']:.2f} |"
            )
    if result.get("chat"):
        lines += [
            "",
            "## Two-turn chats: prefix reuse",
            "",
            "| prefix cache | conversations | turn 1 first token (s) | turn 2 first token (s) | prompt tokens reused "
            "| texts identical (on vs off) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in result["chat"]:
            lines.append(
                f"| {r['prefix_cache']} | {r['conversations']} | {r['turn1_ttft_mean']:.2f} | {r['turn2_ttft_mean']:.2f} "
                f"| {r['reused_tokens']} of {r['prompt_tokens']} | {r['identical']} |"
            )
    if result.get("repeat"):
        lines += [
            "",
            "## A repeating workload (data/repeat_workload), several clients: the suffix index",
            "",
            "| suffix index | clients | requests | aggregate tok/s | index tokens | index MB | texts identical (on vs off) |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in result["repeat"]:
            lines.append(
                f"| {r['suffix_index']} | {r['clients']} | {r['requests']} | {r['aggregate_tps']:.1f} "
                f"| {r['index_tokens']} | {r['index_mb']:.1f} | {r['identical']} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> Path | None:
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        xs = [r["clients"] for r in mine]
        for ax, key in zip(axes, ("aggregate_tps", "ttft_p50", "itl_p99"), strict=True):
            ax.plot(xs, [r[key] for r in mine], marker="o", label=method)
    titles = ("aggregate tokens/s", "time to first token, p50 (s)", "inter-token latency, p99 (s)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path = out / "load.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_load_parser(sub) -> None:
    from ..fetch import DEFAULT_MODEL

    p = sub.add_parser("bench-serve", help="many concurrent clients against the server, through HTTP")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--questions", default=None, help="Spec-Bench question.jsonl (default: the built-in suite)")
    p.add_argument("--scenarios", default="clients", help="comma-separated: clients, join, chat, repeat")
    p.add_argument(
        "--workload",
        default=str(Path(__file__).resolve().parents[3] / "data" / "repeat_workload" / "question.jsonl"),
        help="repeat: the repeating workload's questions",
    )
    p.add_argument("--clients", default="1,2,4,8")
    p.add_argument("--methods", default="ar,hybrid")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=None, help="the server's batch size (default: by measurement)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="the server's chunk (default: by measurement)")
    p.add_argument("--join-tokens", type=int, default=2000, help="join: the long prompt's length, about")
    p.add_argument("--join-streams", type=int, default=4, help="join: streams running when it joins")
    p.add_argument("--conversations", type=int, default=4, help="chat: two-turn conversations")
    p.add_argument("--out", default="results/load")
    p.set_defaults(func=cmd_load)


def long_prompt(questions, tokenizer, tokens: int) -> str:
    """About ``tokens`` tokens of the suite's longest texts, ending with a request to summarize them."""
    texts = sorted((t for q in questions for t in q.turns), key=len, reverse=True)
    out = ""
    for text in texts * 10:
        if _tokens_of(tokenizer, out) >= tokens:
            break
        out += text + "\n\n"
    ids = tokenizer(out, add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids) + "\n\nSummarize the text above in one sentence."


def cmd_load(a) -> int:
    import datetime as dt

    import torch

    from ..models import load
    from .run import machine_info
    from .suite import BenchInputError, builtin_questions, load_questions

    clients = sorted({int(c) for c in a.clients.split(",")})
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    if not clients or min(clients) < 1 or a.max_new_tokens < 1:
        raise BenchInputError("--clients must be positive counts and --max-new-tokens positive.")
    if set(scenarios) - {"clients", "join", "chat", "repeat"}:
        raise BenchInputError(f"--scenarios takes clients, join, chat, repeat; got {a.scenarios!r}.")
    questions = load_questions(a.questions) if a.questions else builtin_questions()
    model, tokenizer = load(a.model, dtype=a.dtype)
    turns = [q.turns[0] for q in questions]
    prompts = [turns[i % len(turns)] for i in range(max(max(clients), a.join_streams))]
    settings = {"max_batch": a.max_batch, "prefill_chunk": a.prefill_chunk, "max_queue": 256}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(s):
        print(s, file=sys.stderr)

    result: dict = {}
    if "clients" in scenarios:
        result["clients"] = clients_scenario(
            model, tokenizer, a.model, prompts, clients, methods, a.max_new_tokens, settings, log
        )
    if "join" in scenarios:
        text = long_prompt(questions, tokenizer, a.join_tokens)
        result["join"] = join_scenario(
            model, tokenizer, a.model, prompts, text, a.join_streams, max(a.max_new_tokens, 96), settings, log
        )
    if "chat" in scenarios:
        talks = [q.turns[:2] for q in questions if len(q.turns) >= 2][: a.conversations]
        if not talks:
            raise BenchInputError("chat needs questions with two turns (Spec-Bench's mt_bench).")
        result["chat"] = chat_scenario(model, tokenizer, a.model, talks, a.max_new_tokens, settings, log)
    if "repeat" in scenarios:
        work = [q.turns[0] for q in load_questions(a.workload)]
        result["repeat"] = repeat_scenario(
            model, tokenizer, a.model, work, max(clients), a.max_new_tokens, settings, log
        )
    machine = machine_info()
    info = {
        "model": a.model, "dtype": str(model.dtype).replace("torch.", ""), "cpu": machine["cpu"],
        "threads": torch.get_num_threads(), "torch": machine["torch"], "max_new_tokens": a.max_new_tokens,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }  # fmt: skip
    (out / "load.json").write_text(json.dumps({"info": info, **result}, indent=1))
    text = markdown(result, info)
    (out / "load.md").write_text(text)
    plot(result.get("clients") or [], out)
    print(text)
    return 0
