"""``clasp bench-serve``: many users at once against the serving engine, with and without speculation.

For each method (``ar``: plain decoding, ``hybrid``: the default speculation) and each number of clients
``N``, ``N`` streaming clients send one request each at the same moment (a different Spec-Bench-style
question each) to one :class:`~..engine.Engine` (the server's, without HTTP in between); the run reports
aggregate tokens per second (all tokens over the wall time), each request's own tokens per second, and
time to first token, and checks every response against the same request run alone.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from ..config import GenerationConfig
from ..engine import Engine, Job


async def _client(job: Job, t0: float) -> dict:
    first, text, result = None, "", None
    while True:
        kind, payload = await job.events.get()
        if kind == "delta":
            first = first if first is not None else time.perf_counter() - t0
            text += payload
        elif kind == "done":
            result = payload
            break
        else:
            raise RuntimeError(f"a load-test request ended with {kind}: {payload}")
    return {"ttft": first if first is not None else time.perf_counter() - t0, "end": time.perf_counter() - t0,
            "tokens": len(result.token_ids), "ids": result.token_ids}  # fmt: skip


def run_clients(engine: Engine, prompts: list[list[int]], config: GenerationConfig) -> dict:
    """Every prompt submitted at once, streamed; per request: time to first token, end, tokens, ids."""

    async def main():
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        jobs = [Job(p, config, loop, deadline=time.monotonic() + 3600) for p in prompts]
        for job in jobs:
            engine.submit(job)
        return await asyncio.gather(*(_client(job, t0) for job in jobs))

    per = asyncio.run(main())
    wall = max(r["end"] for r in per)
    return {
        "clients": len(prompts),
        "aggregate_tps": sum(r["tokens"] for r in per) / wall,
        "per_request_tps": statistics.mean(r["tokens"] / r["end"] for r in per),
        "ttft_mean": statistics.mean(r["ttft"] for r in per),
        "ttft_max": max(r["ttft"] for r in per),
        "ids": [r["ids"] for r in per],
    }


def load_benchmark(model, tokenizer, prompts, clients, methods, max_new_tokens, max_batch, log=print) -> list[dict]:
    """The runs of :func:`run_clients` for every method and client count, each against the solo texts."""
    rows = []
    for method in methods:
        config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, method=method)
        engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max(clients) + 1)
        try:
            run_clients(engine, prompts[:2], config.updated(max_new_tokens=8, min_new_tokens=8))  # warm-up
            solo = run_clients(engine, prompts[:1], config) if 1 in clients else None
            alone = {}
            for n in clients:
                res = solo if n == 1 and solo is not None else run_clients(engine, prompts[:n], config)
                for i in range(n):  # every response against the same request alone (measured once)
                    if i not in alone:
                        alone[i] = res["ids"][i] if n == 1 else run_clients(engine, [prompts[i]], config)["ids"][0]
                same = sum(res["ids"][i] == alone[i] for i in range(n))
                row = {k: v for k, v in res.items() if k != "ids"}
                row.update(method=method, identical=f"{same}/{n}", max_batch=engine.max_batch)
                rows.append(row)
                log(
                    f"  {method} x{n}: {row['aggregate_tps']:.1f} tok/s aggregate, "
                    f"{row['per_request_tps']:.1f} per request, first token {row['ttft_mean']:.2f} s, {row['identical']}"
                )
        finally:
            engine.close()
    return rows


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        f"# Load: {info['model']}",
        "",
        f"- {info['cpu']}, {info['threads']} threads, dtype {info['dtype']}, torch {info['torch']}; "
        f"{info['max_new_tokens']} new tokens per request, greedy; engine max batch {info['max_batch']}; {info['date']}",
        "- N clients send one request each at the same moment; aggregate = all tokens / wall time.",
        "",
        "| method | clients | aggregate tok/s | x one client | per-request tok/s | first token (mean, s) | first token (max, s) | same as alone |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    one = {r["method"]: r for r in rows if r["clients"] == 1}
    for r in rows:
        base = one.get(r["method"])
        ratio = f"{r['aggregate_tps'] / base['aggregate_tps']:.2f}x" if base else "n/a"
        lines.append(
            f"| `{r['method']}` | {r['clients']} | {r['aggregate_tps']:.1f} | {ratio} | {r['per_request_tps']:.1f} "
            f"| {r['ttft_mean']:.2f} | {r['ttft_max']:.2f} | {r['identical']} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        xs = [r["clients"] for r in mine]
        for ax, key in zip(axes, ("aggregate_tps", "per_request_tps", "ttft_mean"), strict=True):
            ax.plot(xs, [r[key] for r in mine], marker="o", label=method)
    for ax, title in zip(axes, ("aggregate tokens/s", "tokens/s per request", "time to first token (s)"), strict=True):
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

    p = sub.add_parser("bench-serve", help="many concurrent clients against the serving engine")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--questions", default=None, help="Spec-Bench question.jsonl (default: the built-in suite)")
    p.add_argument("--clients", default="1,2,4,8,16")
    p.add_argument("--methods", default="ar,hybrid")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=None, help="the engine's batch size (default: by measurement)")
    p.add_argument("--out", default="results/load")
    p.set_defaults(func=cmd_load)


def cmd_load(a) -> int:
    import datetime as dt

    import torch

    from ..models import load
    from ..text import encode_prompt
    from .run import machine_info
    from .suite import BenchInputError, builtin_questions, load_questions

    clients = sorted({int(c) for c in a.clients.split(",")})
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if not clients or min(clients) < 1 or a.max_new_tokens < 1:
        raise BenchInputError("--clients must be positive counts and --max-new-tokens positive.")
    questions = load_questions(a.questions) if a.questions else builtin_questions()
    model, tokenizer = load(a.model, dtype=a.dtype)
    turns = [q.turns[0] for q in questions]
    prompts = [
        encode_prompt(tokenizer, [{"role": "user", "content": turns[i % len(turns)]}]) for i in range(max(clients))
    ]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_benchmark(
        model, tokenizer, prompts, clients, methods, a.max_new_tokens, a.max_batch, lambda s: print(s, file=sys.stderr)
    )
    machine = machine_info()
    info = {
        "model": a.model, "dtype": str(model.dtype).replace("torch.", ""), "cpu": machine["cpu"],
        "threads": torch.get_num_threads(), "torch": machine["torch"], "max_new_tokens": a.max_new_tokens,
        "max_batch": rows[0]["max_batch"] if rows else None,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }  # fmt: skip
    (out / "load.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    text = markdown(rows, info)
    (out / "load.md").write_text(text)
    plot(rows, out)
    print(text)
    return 0
