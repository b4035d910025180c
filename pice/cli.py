"""`pice` command line: serve, ask, models, bench."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from pice.shared.config import ServeSettings
from pice.shared.errors import PiceError
from pice.shared.models import DEFAULT_CLOUD_MODEL, DEFAULT_EDGE_MODEL, models_main


def _settings(args: argparse.Namespace) -> ServeSettings:
    overrides = {k: v for k, v in {
        "host": getattr(args, "host", None), "port": getattr(args, "port", None),
        "cloud_model": args.cloud_model, "edge_models": args.edge_model,
        "cache_dir": args.cache_dir, "threads": args.threads,
        "backend": getattr(args, "backend", None),
        "quantization": getattr(args, "quantization", None),
        "edge_tokens_file": getattr(args, "edge_tokens_file", None),
        "local_edges": False if getattr(args, "no_local_edges", False) else None,
        "cloud_backend": getattr(args, "cloud_backend", None),
    }.items() if v is not None}
    return ServeSettings(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pice.cloud.api.app import create_app
    from pice.cloud.api.connections import server_config
    from pice.runtime import build_pipeline

    settings = _settings(args)
    if args.ray:
        from pice.cloud.serve.app import run
        from pice.cloud.serve.settings import RaySettings

        print(f"pice: Ray Serve on http://{settings.host}:{settings.port} (cloud backend "
              f"{settings.cloud_backend}); GET /ready turns 200 when a gateway has loaded",
              file=sys.stderr)
        run(settings, RaySettings())
        return 0
    print(f"pice: serving on http://{settings.host}:{settings.port} "
          f"(cloud={settings.cloud_model}, edge={','.join(settings.edge_models)}); "
          "GET /ready turns 200 when the models are loaded", file=sys.stderr)
    app = create_app(settings, build_pipeline)
    uvicorn.Server(server_config(app, settings, ssl_certfile=args.ssl_certfile,
                                 ssl_keyfile=args.ssl_keyfile)).run()
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from pice.ask import RemoteOptions, ask_local, ask_remote, default_url

    body = {"question": args.question, "mode": args.mode, "max_points": args.max_points,
            "max_tokens": args.max_tokens}
    if args.local:
        return asyncio.run(ask_local(_settings(args), body))
    local_only = [f"--{k.replace('_', '-')}" for k in ("cloud_model", "edge_model", "cache_dir",
                  "threads", "backend", "quantization") if getattr(args, k) is not None]
    if local_only:
        print(f"pice: error: {', '.join(local_only)} apply with --local only (a running server "
              "answers with its own models)", file=sys.stderr)
        return 2
    url = (args.url or default_url(ServeSettings())).rstrip("/")
    return ask_remote(RemoteOptions(url, args.api_key, args.wait, args.timeout), body)


def cmd_models(args: argparse.Namespace) -> int:
    return models_main(args.action, args.names, args.cache_dir)


def cmd_edge(args: argparse.Namespace) -> int:
    from pice.edge.agent_config import AgentConfig
    from pice.runtime import run_edge_agent

    fields = {"cloud": args.cloud, "token": args.token or os.environ.get("PICE_EDGE_TOKEN"),
              "edge_id": args.edge_id, "models": args.model or [DEFAULT_EDGE_MODEL],
              "slots": args.slots, "ca_file": args.ca_file,
              "drain_timeout_s": args.drain_timeout}
    if fields["token"] is None:
        print("pice: error: no edge token: pass --token or set PICE_EDGE_TOKEN", file=sys.stderr)
        return 2
    cfg = AgentConfig(**{k: v for k, v in fields.items() if v is not None})
    settings = ServeSettings(**{k: v for k, v in {
        "cache_dir": args.cache_dir, "threads": args.threads, "backend": args.backend,
        "quantization": args.quantization}.items() if v is not None})
    if args.group:
        from pice.edge.group.agent import run_group_agent_cli

        return run_group_agent_cli(cfg, settings, args.group, args.group_listen,
                                   args.group_advertise, args.group_memory_mb)
    return run_edge_agent(cfg, settings)


def cmd_edge_token(args: argparse.Namespace) -> int:
    from pice.cloud.edge_tokens import edge_token_main

    return edge_token_main(args.action, args.name, args.file or ServeSettings().edge_tokens_file)


def cmd_route(args: argparse.Namespace) -> int:
    if args.train:
        from pice.scheduler.train_router import main as train_main

        return train_main([])
    from pice.scheduler.route_cli import RouteArgs, route

    return route(RouteArgs(args.questions, args.policy, args.max_tokens, args.edges, args.slots,
                           args.json))


def cmd_bench_sim(args: argparse.Namespace) -> int:
    from pice.bench.sim import SimBenchConfig, run_sim_bench

    loads = [float(x) for x in args.loads.split(",")]
    cfg = SimBenchConfig(loads=loads, requests=args.requests, edges=args.edges,
                         cloud_replicas=args.cloud_replicas, decision_edges=args.decision_edges,
                         decision_requests=args.decision_requests,
                         big_requests=args.big_requests, seed=args.seed, out_dir=args.out)
    summary = run_sim_bench(cfg)
    print(json.dumps({k: summary[k] for k in ("decision_time", "verdict")}, indent=1))
    if "large_run" in summary:
        print(json.dumps({k: v for k, v in summary["large_run"].items() if k != "result"}))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pice.bench.progressive import BenchConfig, run_bench

    cfg = BenchConfig(cloud_model=args.cloud_model or DEFAULT_CLOUD_MODEL,
                      edge_model=(args.edge_model or [DEFAULT_EDGE_MODEL])[0],
                      limit=args.limit, max_tokens=args.max_tokens, out_dir=args.out,
                      cache_dir=args.cache_dir, threads=args.threads or 0,
                      categories=args.category, backend=args.backend or "engine",
                      quantization=args.quantization, edges=args.edges)
    summary = run_bench(cfg)
    print(json.dumps(summary["ratios"], indent=2))
    return 0


def cmd_bench_quality(args: argparse.Namespace) -> int:
    from pice.bench.quality import QualityConfig, run_quality

    fields = {"cloud_model": args.cloud_model, "edge_models": args.edge_model,
              "limit": args.limit, "categories": args.category, "max_tokens": args.max_tokens,
              "out_dir": args.out, "cache_dir": args.cache_dir, "threads": args.threads,
              "backend": args.backend, "adapter": args.adapter,
              "validate_limit": args.validate_limit, "concurrency": args.concurrency,
              "pairwise_pairs": args.pairwise_pairs, "latency_limit": args.latency_limit}
    cfg = QualityConfig(**{k: v for k, v in fields.items() if v is not None})
    cfg.suitable_only = not args.all_questions
    cfg.judge = not args.no_judge
    cfg.validate_only = args.validate_only
    cfg.eager_compare = not args.no_eager_compare
    cfg.judge_no_eager = args.judge_no_eager
    result = run_quality(cfg)
    if cfg.validate_only or not cfg.judge:
        print(json.dumps(result.get("judge_validation", result.get("timing")), indent=2))
        return 0
    print(json.dumps({"judge_validation": result["judge_validation"]["judge"],
                      "target": result["target"], "overall": result["summary"]["overall"],
                      "timing": result["summary"]["timing"]}, indent=2))
    return 0


def cmd_bench_engine(args: argparse.Namespace) -> int:
    from pice.bench.engine import EngineBenchConfig, run_engine_bench

    if args.peer or args.quick:
        from pice.bench.engine_peer import PeerBenchConfig, run_peer_bench

        peer = PeerBenchConfig(model=args.model, quick=args.quick, out_dir=args.out,
                               cache_dir=args.cache_dir, threads=args.threads,
                               decode_tokens=args.decode_tokens)
        print(json.dumps(run_peer_bench(peer)["table"], indent=2))
        return 0

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    cfg = EngineBenchConfig(model=args.model, batch_sizes=sizes, decode_tokens=args.decode_tokens,
                            int8_batch_sizes=[b for b in (1, 8) if b in sizes] or sizes[:1],
                            out_dir=args.out, cache_dir=args.cache_dir, threads=args.threads)
    print(json.dumps(run_engine_bench(cfg)["ratios"], indent=2))
    return 0


def cmd_bench_group(args: argparse.Namespace) -> int:
    from pice.bench.group import GroupBenchConfig, run_group_bench

    cfg = GroupBenchConfig(model=args.model, inflight=[int(n) for n in args.inflight.split(",")],
                           decode_tokens=args.decode_tokens, cache_dir=args.cache_dir,
                           out_dir=args.out)
    r = run_group_bench(cfg)
    print(json.dumps({k: r[k] for k in ("plan", "speedup_two_vs_one", "rss_share_per_stage",
                                        "anon_share_per_stage", "failover", "targets")},
                     indent=2))
    return 0


def cmd_bench_aas(args: argparse.Namespace) -> int:
    from pice.bench.aas import AASBenchConfig, run_aas_bench

    cfg = AASBenchConfig(out_dir=args.out, trials=args.trials, resident=args.resident)
    summary = run_aas_bench(cfg)
    print(json.dumps({m: {k: v for k, v in r.items() if k not in ("n", "n_in_domain", "n_null")}
                      for m, r in summary["methods"].items()}, indent=2))
    return 0


def cmd_train_expander(args: argparse.Namespace) -> int:
    from pice.edge.distill import DistillConfig
    from pice.runtime import train_expander

    fields = {"cloud_model": args.cloud_model, "edge_model": args.edge_model,
              "questions": args.questions, "limit": args.limit, "out_dir": args.out,
              "data": args.data, "cache_dir": args.cache_dir, "steps": args.steps,
              "rank": args.rank, "lr": args.lr, "batch_size": args.batch_size,
              "batch_questions": args.batch_questions, "last_layers": args.last_layers,
              "max_seq_len": args.max_seq_len, "checkpoint_every": args.checkpoint_every,
              "resume": args.resume, "threads": args.threads, "point_tokens": args.point_tokens}
    cfg = DistillConfig(**{k: v for k, v in fields.items() if v is not None})
    print(json.dumps(train_expander(cfg, args.stage), indent=2))
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cloud-model", help=f"cloud model spec (default {DEFAULT_CLOUD_MODEL})")
    p.add_argument("--edge-model", action="append",
                   help=f"edge model spec, repeatable (default {DEFAULT_EDGE_MODEL})")
    p.add_argument("--cache-dir", type=Path, help="model cache (default ~/.cache/pice)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--backend", choices=["engine", "hf"],
                   help="engine: pice's paged-KV engine (default); hf: transformers generate")
    p.add_argument("--quantization", choices=["gguf", "int8", "int4", "none"],
                   help="engine weights: the GGUF's own quantization (default for GGUF models), "
                        "int8/int4 weight-only, or none (float)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pice", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the API with the embedded cloud model and edge workers")
    _model_args(p)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--edge-tokens-file", type=Path,
                   help="accept remote edge agents holding a token from this file")
    p.add_argument("--no-local-edges", action="store_true",
                   help="no in-process edge workers: remote agents only")
    p.add_argument("--cloud-backend", choices=["local", "openai", "vllm"],
                   help="who serves the cloud model (default local; openai: PICE_OPENAI_*)")
    p.add_argument("--ray", action="store_true",
                   help="run on Ray Serve: gateway + cloud-model deployments (PICE_RAY_*)")
    p.add_argument("--ssl-certfile", help="serve HTTPS/WSS with this certificate")
    p.add_argument("--ssl-keyfile", help="private key of --ssl-certfile")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("edge", help="run an edge agent that dials the cloud and expands points")
    p.add_argument("--cloud", required=True, help="cloud URL: ws(s)://host:port or http(s)://…")
    p.add_argument("--token", help="this edge's token (default $PICE_EDGE_TOKEN)")
    p.add_argument("--edge-id", help="edge id its token was issued to (default: host name)")
    p.add_argument("--model", action="append",
                   help=f"model spec to serve, repeatable (default {DEFAULT_EDGE_MODEL})")
    p.add_argument("--slots", type=int, help="points run at once (default 8)")
    p.add_argument("--ca-file", type=Path, help="CA bundle for a wss:// cloud")
    p.add_argument("--drain-timeout", type=float, help="SIGTERM: seconds to finish work")
    p.add_argument("--cache-dir", type=Path, help="model cache (default ~/.cache/pice)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--backend", choices=["engine", "hf"])
    p.add_argument("--quantization", choices=["gguf", "int8", "int4", "none"])
    p.add_argument("--group", help="join edge group NAME: serve a layer range of the model "
                   "together with the group's other members")
    p.add_argument("--group-listen", default="0.0.0.0:0",
                   help="group data plane: host:port the previous stage dials")
    p.add_argument("--group-advertise", help="host the previous stage dials (default: the "
                   "listen host)")
    p.add_argument("--group-memory-mb", type=int,
                   help="memory offered to the group (default: MemAvailable)")
    p.set_defaults(fn=cmd_edge)

    p = sub.add_parser("edge-token", help="create, list or revoke edge agent tokens")
    p.add_argument("action", choices=["create", "list", "revoke"])
    p.add_argument("name", nargs="?", help="create: edge id; revoke: token id or edge id")
    p.add_argument("--file", type=Path, help="token file (default $PICE_EDGE_TOKENS_FILE)")
    p.set_defaults(fn=cmd_edge_token)

    p = sub.add_parser("ask", help="ask the running server one question; prints the sketch, "
                       "then each section")
    _model_args(p)
    p.add_argument("question")
    p.add_argument("--mode", default="auto", choices=["auto", "cloud", "progressive"])
    p.add_argument("--max-points", type=int)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--url", help="the server (default http://PICE_HOST:PICE_PORT, "
                   "i.e. http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=os.environ.get("PICE_API_KEY"),
                   help="the server's API key, if it has keys (default $PICE_API_KEY)")
    p.add_argument("--wait", type=float, default=600.0,
                   help="seconds to wait for a server still loading its models (default 600)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds for the whole answer once asked (default 900)")
    p.add_argument("--local", action="store_true",
                   help="no server: load every model in this process (the model flags apply)")
    p.set_defaults(fn=cmd_ask)

    p = sub.add_parser("models", help="list, prepare (assemble + convert) or verify models")
    p.add_argument("action", choices=["list", "prepare", "verify"], nargs="?", default="list")
    p.add_argument("names", nargs="*", help="aliases (default: all packaged models)")
    p.add_argument("--cache-dir", type=Path)
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("route", help="router probability and scheduler decision per question "
                       "(no LLM loaded)")
    p.add_argument("questions", nargs="*", help="questions (default: one per line on stdin)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--policy", default="dynamic",
                   choices=["dynamic", "router-only", "always-cloud", "always-progressive"])
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--edges", type=int, default=1, help="idle edges the decision may use")
    p.add_argument("--slots", type=int, default=8, help="slots per edge")
    p.add_argument("--train", action="store_true",
                   help="retrain the router on the packaged data and rewrite its weights")
    p.set_defaults(fn=cmd_route)

    p = sub.add_parser("bench", help="benchmarks (JSON + PNG)")
    bsub = p.add_subparsers(dest="bench", required=True)
    e = bsub.add_parser("engine", help="transformers generate vs the pice engine")
    e.add_argument("--model", default=DEFAULT_EDGE_MODEL)
    e.add_argument("--batch-sizes", default="1,4,8,16,32")
    e.add_argument("--decode-tokens", type=int, default=32)
    e.add_argument("--cache-dir", type=Path)
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("--out", type=Path, default=Path("bench-results"))
    e.add_argument("--peer", choices=["llama.cpp"],
                   help="pice (GGUF, int8, fp32) vs llama.cpp and transformers on the same GGUF")
    e.add_argument("--quick", action="store_true",
                   help="with --peer: llama.cpp vs pice on the GGUF, batch 1 and 8")
    e.set_defaults(fn=cmd_bench_engine)
    m = bsub.add_parser("sim", help="the four scheduler policies in the discrete-event "
                        "simulator; decision time at 10,000 edges")
    m.add_argument("--loads", default="0.25,0.5,1,1.5,2,3",
                   help="offered loads, x full-cloud capacity")
    m.add_argument("--requests", type=int, default=2000, help="per policy and load")
    m.add_argument("--edges", type=int, default=100)
    m.add_argument("--cloud-replicas", type=int, default=5)
    m.add_argument("--decision-edges", type=int, default=10_000)
    m.add_argument("--decision-requests", type=int, default=20_000)
    m.add_argument("--big-requests", type=int, default=0,
                   help="also time one run of this many requests at --decision-edges")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", type=Path, default=Path("bench-results"))
    m.set_defaults(fn=cmd_bench_sim)
    b = bsub.add_parser("progressive", help="progressive vs full cloud on the question set")
    _model_args(b)
    b.add_argument("--limit", type=int, default=0, help="questions to run (0 → all)")
    b.add_argument("--category", action="append", help="only these categories (repeatable)")
    b.add_argument("--edges", choices=["local", "remote"], default="local",
                   help="remote: in-process worker vs edge agents over loopback, and the cost "
                   "of killing an agent mid-run (suitable questions; --limit default 6)")
    b.add_argument("--max-tokens", type=int, default=256)
    b.add_argument("--out", type=Path, default=Path("bench-results"))
    b.set_defaults(fn=cmd_bench)
    q = bsub.add_parser("quality", help="progressive answers (ensemble + distilled adapter, "
                        "eager and not) judged against full-cloud answers by a validated judge")
    _model_args(q)
    q.add_argument("--limit", type=int, help="questions, round-robin over categories "
                   "(default 40; 0 → all)")
    q.add_argument("--category", action="append", help="only these categories (repeatable)")
    q.add_argument("--all-questions", action="store_true",
                   help="include questions labeled as not suiting a sketch")
    q.add_argument("--max-tokens", type=int, help="per answer (default 320)")
    q.add_argument("--adapter", type=Path, help="distilled adapter for the first edge model "
                   "(default: the shipped one)")
    q.add_argument("--concurrency", type=int, help="requests in flight (default 4)")
    q.add_argument("--latency-limit", type=int, help="questions also answered one at a time, "
                   "timed only (default 6; 0: none, e.g. with --concurrency 1)")
    q.add_argument("--no-judge", action="store_true", help="answers only (cached)")
    q.add_argument("--validate-only", action="store_true", help="validate the judge on "
                   "corrupted full answers, write quality_judge.json, stop")
    q.add_argument("--validate-limit", type=int, help="full answers to validate on, 5 "
                   "corruptions each (default 8)")
    q.add_argument("--pairwise-pairs", type=int, help="validation pairs also judged by the "
                   "A/B prompt, for its position bias (default 0)")
    q.add_argument("--no-eager-compare", action="store_true", help="skip the non-eager phase")
    q.add_argument("--judge-no-eager", action="store_true", help="also judge the non-eager "
                   "answers (default: timed only)")
    q.add_argument("--out", type=Path, default=Path("bench-results"))
    q.set_defaults(fn=cmd_bench_quality)

    p = sub.add_parser("train", help="train adapters")
    tsub = p.add_subparsers(dest="train", required=True)
    t = tsub.add_parser("expander", help="distill the cloud model's point expansions into a LoRA "
                        "adapter for an edge model (teacher data, then peft training on the CPU)")
    t.add_argument("--cloud-model", help="teacher (default: the cloud default)")
    t.add_argument("--edge-model", help="student the adapter is for (default: the edge default)")
    t.add_argument("--questions", type=Path, help="training questions JSONL (default: shipped)")
    t.add_argument("--limit", type=int, help="questions to use (0 → all)")
    t.add_argument("--data", type=Path, help="teacher pairs JSONL (default <out>/pairs.jsonl)")
    t.add_argument("--out", type=Path, help="adapter directory (default adapters/expander)")
    t.add_argument("--stage", choices=["all", "data", "train"], default="all")
    t.add_argument("--steps", type=int)
    t.add_argument("--rank", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--batch-questions", type=int, help="questions per teacher batch")
    t.add_argument("--point-tokens", type=int,
                   help="teacher tokens per expansion (default 48; a cut-off one is dropped)")
    t.add_argument("--last-layers", type=int, help="LoRA on the last N layers only (0 → all)")
    t.add_argument("--max-seq-len", type=int)
    t.add_argument("--checkpoint-every", type=int)
    t.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    t.add_argument("--cache-dir", type=Path)
    t.add_argument("--threads", type=int)
    t.set_defaults(fn=cmd_train_expander)
    g = bsub.add_parser("group", help="edge group: 1 vs 2 stage processes pinned to one core "
                        "each (tokens/s vs sequences in flight, bubbles, RSS, failover cost)")
    g.add_argument("--model", default=DEFAULT_EDGE_MODEL)
    g.add_argument("--inflight", default="1,2,4,8", help="sequences in flight to measure")
    g.add_argument("--decode-tokens", type=int, default=32)
    g.add_argument("--cache-dir", type=Path)
    g.add_argument("--out", type=Path, default=Path("bench-results"))
    g.set_defaults(fn=cmd_bench_group)
    a = bsub.add_parser("aas", help="automatic adapter selection on the labeled routing set")
    a.add_argument("--resident", type=int, default=3, help="resident adapters per cache trial")
    a.add_argument("--trials", type=int, default=50, help="random resident sets per margin")
    a.add_argument("--out", type=Path, default=Path("bench-results"))
    a.set_defaults(fn=cmd_bench_aas)
    from pice.bench.lora import add_lora_parser
    from pice.bench.scale import add_scale_parser

    add_lora_parser(bsub)
    add_scale_parser(bsub)
    from pice.shared.lora.compress.cli import add_adapters_parser

    add_adapters_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # one INFO line per HTTP request (pice ask polls /ready) is noise
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return int(args.fn(args))
    except PiceError as exc:
        print(f"pice: error: {exc.message}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # bad settings (flags or PICE_* environment variables)
        print(f"pice: invalid settings: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
