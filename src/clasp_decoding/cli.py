"""The ``clasp`` command: ``generate``, ``models``, ``bench`` and ``serve``."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence

from .config import QUANT_KINDS, GenerationConfig
from .drafting.registry import METHODS
from .errors import ClaspError
from .fetch import BUILTIN_MODELS, DEFAULT_MODEL


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        default=DEFAULT_MODEL,
        help=f"built-in name ({', '.join(BUILTIN_MODELS)}), hub id, local folder or .gguf file "
        f"(default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--dtype", default="auto", help="auto (bf16 where the hardware is fast at it, else fp32), bf16, fp32"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    d = GenerationConfig()
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", "-n", type=int, default=d.max_new_tokens)
    g.add_argument("--temperature", "-t", type=float, default=d.temperature, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=d.top_p)
    g.add_argument("--top-k", type=int, default=d.top_k)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    c = p.add_argument_group("CLaSp")
    c.add_argument(
        "--method",
        choices=list(METHODS),
        default=d.method,
        help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()),
    )
    c.add_argument("--skip-ratio", type=float, default=d.skip_ratio, help="fraction of layers the draft skips")
    c.add_argument(
        "--num-skip", type=int, default=None, help="number of layers the draft skips (overrides --skip-ratio)"
    )
    c.add_argument("--skip-layers", default=None, help="fixed skip set for --method static, e.g. 3,5,7")
    c.add_argument(
        "--draft-exit-threshold",
        "--det",
        dest="det",
        type=float,
        default=d.draft_exit_threshold,
        help="stop drafting after a token whose draft probability is below this (the paper's DET)",
    )
    c.add_argument(
        "--max-draft-tokens",
        "--max-draft",
        dest="max_draft",
        type=int,
        default=d.max_draft_tokens,
        help="longest layer-skip draft per round",
    )
    c.add_argument(
        "--layer-opt-interval",
        "--loi",
        dest="loi",
        type=int,
        default=d.layer_opt_interval,
        help="re-run the layer-selection DP every this many rounds (the paper's LOI)",
    )
    c.add_argument(
        "--draft-quant", choices=QUANT_KINDS, default=d.draft_quant, help="weight-only quantization of the draft"
    )
    c.add_argument("--draft-vocab", type=int, default=d.draft_vocab, help="draft head vocabulary size (0 = full)")
    c.add_argument(
        "--adaptive", action=argparse.BooleanOptionalAction, default=d.adaptive, help="cost-aware control of drafting"
    )


def config_from_args(a: argparse.Namespace) -> GenerationConfig:
    skip_layers = None
    if a.skip_layers:
        try:
            skip_layers = tuple(int(x) for x in a.skip_layers.split(",") if x.strip())
        except ValueError:
            raise ClaspError(f"--skip-layers must be comma-separated integers, got {a.skip_layers!r}.") from None
    return GenerationConfig(
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        seed=a.seed,
        stop=tuple(a.stop),
        method=a.method,
        skip_ratio=a.skip_ratio,
        num_skip=a.num_skip,
        skip_layers=skip_layers,
        draft_exit_threshold=a.det,
        max_draft_tokens=a.max_draft,
        layer_opt_interval=a.loi,
        draft_quant=a.draft_quant,
        draft_vocab=a.draft_vocab,
        adaptive=a.adaptive,
    )


def compare_with_plain(model, plain, tokenizer, prompt_ids, config, result) -> dict:
    """``--compare``: time plain decoding both ways, ours (``ar``: the text every method must equal) and
    ``transformers``' ``generate`` on an untouched copy (the baseline users have); the speedup is over the
    faster of the two, as a benchmark's should be."""
    from .api import eos_ids_of, generate
    from .baselines import hf_generate

    ar = generate(model, tokenizer, prompt_ids, config.updated(method="ar"))
    hf_ids, seconds = hf_generate(plain, tokenizer, prompt_ids, config, eos_ids_of(model, tokenizer))
    hf_tps = len(hf_ids) / seconds if seconds > 0 else 0.0
    best = max(ar.stats.tokens_per_second, hf_tps)
    greedy = config.temperature == 0
    seeded = config.seed is not None
    return {
        "baseline": "ar" if ar.stats.tokens_per_second >= hf_tps else "transformers generate",
        "baseline_tokens_per_second": round(best, 4),
        "ar_tokens_per_second": round(ar.stats.tokens_per_second, 4),
        "generate_tokens_per_second": round(hf_tps, 4),
        "speedup": round(result.stats.tokens_per_second / best, 4) if best else None,
        "identical": ar.token_ids == result.token_ids if greedy or seeded else None,
        "identical_to_generate": hf_ids == result.token_ids if greedy else None,
    }


def cmd_generate(a: argparse.Namespace) -> int:
    from .api import eos_ids_of, generate
    from .baselines import hf_generate
    from .models import load
    from .text import encode_prompt

    prompt = a.prompt if a.prompt is not None else sys.stdin.read()
    config = config_from_args(a)
    model, tokenizer = load(a.model, dtype=a.dtype, device=a.device, quiet=a.json)
    prompt_ids = encode_prompt(tokenizer, prompt, raw=a.raw)
    config.validate(model.config.num_hidden_layers)
    plain = None
    if a.compare:  # warm every path up so none pays first-call costs in the timed runs
        from .baselines import pristine_copy

        short = config.updated(max_new_tokens=min(4, config.max_new_tokens), stop=())
        generate(model, tokenizer, prompt_ids, short)
        generate(model, tokenizer, prompt_ids, short.updated(method="ar"))
        plain = pristine_copy(model)  # the generate users have: without the project's numerics
        hf_generate(plain, tokenizer, prompt_ids, short, eos_ids_of(model, tokenizer))
    show = None if a.json else (lambda piece: print(piece, end="", flush=True))
    result = generate(model, tokenizer, prompt_ids, config, callback=show)
    st = result.stats
    out = {
        "model": a.model,
        "method": config.method,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "new_tokens": st.new_tokens,
        "mean_accepted_tokens": round(st.mean_accepted_tokens, 4),
        "acceptance_rate": round(st.acceptance_rate, 4),
        "tokens_per_second": round(st.tokens_per_second, 4),
        "stats": st.to_dict(),
    }
    if a.compare:
        out.update(compare_with_plain(model, plain, tokenizer, prompt_ids, config, result))
    if a.json:
        print(json.dumps(out, ensure_ascii=False))
        return 0
    print()
    t = st.to_dict()["time"]
    print(
        f"\n[{config.method}] {st.new_tokens} tokens in {st.time_total:.2f} s = {st.tokens_per_second:.2f} tok/s; "
        f"mean accepted tokens {st.mean_accepted_tokens:.2f}; draft acceptance {st.acceptance_rate:.0%}; "
        f"time: draft {t['draft']:.2f} s, verify {t['verify']:.2f} s, layer selection {t['layer_selection']:.2f} s, "
        f"prefill {t['prefill']:.2f} s, other {t['other']:.2f} s",
        file=sys.stderr,
    )
    if st.skip_sets:
        print(f"skip sets chosen: {len(st.skip_sets)}; last: {list(st.skip_sets[-1][1])}", file=sys.stderr)
    if a.compare:

        def verdict(same):
            return "n/a (sampling)" if same is None else ("identical" if same else "different")

        print(
            f"plain decoding: ours (ar) {out['ar_tokens_per_second']:.2f} tok/s, text {verdict(out['identical'])}; "
            f"transformers generate {out['generate_tokens_per_second']:.2f} tok/s, text "
            f"{verdict(out['identical_to_generate'])}; speedup over the faster {out['speedup']:.2f}x",
            file=sys.stderr,
        )
        if out["identical_to_generate"] is False:
            print(
                "(an untouched model's generate rounds differently from the project's kernels; where two tokens "
                "tie within rounding its greedy text can take the other: docs/numerics.md)",
                file=sys.stderr,
            )
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    import os

    from .server import Limits, ServerSettings, check_bind, serve

    config = config_from_args(a)
    if a.max_queue < 1 or a.timeout <= 0 or a.default_max_tokens < 1 or a.max_body_mb <= 0:
        raise ClaspError("--max-queue, --timeout, --default-max-tokens and --max-body-mb must be positive.")
    if (a.max_batch is not None and a.max_batch < 1) or (a.kv_pool_tokens is not None and a.kv_pool_tokens < 1):
        raise ClaspError("--max-batch and --kv-pool-tokens must be positive.")
    if (a.prefill_chunk is not None and a.prefill_chunk < 1) or a.drain_timeout < 0 or a.suffix_tokens < 1:
        raise ClaspError("--prefill-chunk and --suffix-tokens must be positive and --drain-timeout at least 0.")
    try:
        vocabs = tuple(sorted({int(v) for v in a.draft_vocabs.split(",")}))
    except ValueError:
        raise ClaspError(f"--draft-vocabs takes integers separated by commas, got {a.draft_vocabs!r}.") from None
    if any(v < 0 for v in vocabs):
        raise ClaspError("--draft-vocabs takes sizes of at least 0 (0: the whole vocabulary).")
    key = a.api_key or os.environ.get("CLASP_API_KEY") or None
    check_bind(a.host, key, a.insecure_no_auth)  # before the model loads: fail fast
    settings = ServerSettings(
        base_config=config,
        max_queue=a.max_queue,
        max_batch=a.max_batch,
        kv_pool_tokens=a.kv_pool_tokens,
        request_timeout=a.timeout,
        default_max_tokens=a.default_max_tokens,
        api_key=key,
        max_body_bytes=int(a.max_body_mb * (1 << 20)),
        limits=Limits(draft_vocabs=tuple(sorted({*vocabs, config.draft_vocab}))),
        prefill_chunk=a.prefill_chunk,
        prefix_cache=a.prefix_cache,
        drain_timeout=a.drain_timeout,
        suffix_index=a.suffix_index,
        suffix_tokens=a.suffix_tokens,
        suffix_file=a.suffix_file,
    )
    serve(
        a.model,
        host=a.host,
        port=a.port,
        dtype=a.dtype,
        device=a.device,
        settings=settings,
        insecure_no_auth=a.insecure_no_auth,
        log_level=a.log_level,
    )
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from .fetch import cache_dir, folder_size_mb, is_cached

    print(f"cache: {cache_dir()}")
    for name, spec in BUILTIN_MODELS.items():
        cached = is_cached(name)
        size = f"{folder_size_mb(spec.folder):.0f} MB on disk" if cached else "not fetched"
        mark = " (default)" if name == DEFAULT_MODEL else ""
        print(f"  {name:20s} {spec.arch:7s} {spec.layers:3d} layers  download {spec.download_mb:5d} MB  {size}{mark}")
        print(f"  {'':20s} {spec.title}")
    if a.fetch:
        from .fetch import fetch_builtin

        for name in a.fetch:
            t0 = time.perf_counter()
            print(f"{name}: {fetch_builtin(name)} ({time.perf_counter() - t0:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clasp", description="CLaSp: lossless layer-skip self-speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with CLaSp (streams, then prints statistics)")
    g.add_argument("prompt", nargs="?", default=None, help="the prompt (read from stdin when absent)")
    add_model_args(g)
    add_generation_args(g)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument(
        "--compare",
        action="store_true",
        help="also run plain decoding (ours, and transformers generate on an untouched copy) and compare",
    )
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="list the built-in models and what is cached")
    m.add_argument("--fetch", nargs="*", choices=list(BUILTIN_MODELS), help="fetch these built-in models now")
    m.set_defaults(func=cmd_models)

    from .bench.cli import add_bench_parser
    from .bench.load import add_load_parser

    add_bench_parser(sub)
    add_load_parser(sub)

    add_serve_parser(sub)
    return parser


def add_serve_parser(sub) -> None:
    """``clasp serve``'s options."""
    s = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    add_model_args(s)
    add_generation_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    s.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY'; several keys separated by commas give each user their own "
        "(default: $CLASP_API_KEY)",
    )
    s.add_argument("--insecure-no-auth", action="store_true", help="allow a non-loopback --host without an API key")
    s.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body, in MiB (413 beyond)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get HTTP 429")
    s.add_argument(
        "--max-batch", type=int, default=None, help="requests generated together (default: chosen by measurement)"
    )
    s.add_argument(
        "--kv-pool-tokens",
        type=int,
        default=None,
        help="cache slots the running requests share (default: max-batch x the model's context, at most 4096 each)",
    )
    s.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="prompt tokens per pass while other requests decode (default: from measured costs, so that a joining "
        "prompt never stalls running streams more than about one step)",
    )
    s.add_argument(
        "--prefix-cache",
        choices=("key", "shared", "off"),
        default="key",
        help="reuse finished requests' caches for prompts that start the same: within one API key (default), "
        "across keys, or not at all",
    )
    s.add_argument(
        "--suffix-index",
        choices=("key", "shared", "off"),
        default="key",
        help="draft from earlier requests' prompts and outputs: each API key's own history (default), everyone's, "
        "or not at all",
    )
    s.add_argument("--suffix-tokens", type=int, default=1 << 20, help="the most tokens the suffix index keeps")
    s.add_argument(
        "--suffix-file",
        default=None,
        help="where the suffix index is kept across restarts (default: the cache folder, per model)",
    )
    s.add_argument(
        "--draft-vocabs",
        default="0,8192,32768",
        help="draft vocabulary sizes a request may ask for in clasp.draft_vocab (each builds a draft head)",
    )
    s.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get to finish on SIGTERM/SIGINT"
    )
    s.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take, queueing included")
    s.add_argument("--default-max-tokens", type=int, default=256, help="chat max_tokens when a request sets none")
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=cmd_serve)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    shown = warnings.formatwarning
    warnings.formatwarning = _plain_warning  # a notice for a terminal, not a source line of the library
    try:
        return int(args.func(args) or 0)
    except ClaspError as e:
        print(f"clasp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clasp: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = shown


def _plain_warning(message, category, filename, lineno, line=None) -> str:
    return f"clasp: {category.__name__}: {message}\n"


if __name__ == "__main__":
    sys.exit(main())
