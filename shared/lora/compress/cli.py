"""`pice adapters compress` (registered by pice.cli): compress the adapters of one base model
into shared bases + per-adapter Σ, print each adapter's outcome, the time and bytes saved.

Adapters come from a directory of PEFT adapter directories (`--dir`, the operator's own) or from
the server's adapter catalog (`--state`: its adapters.json records, with owners and the public
flag, so tenant boundaries hold)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pice.shared.errors import BadRequestError
from pice.shared.lora.compress.run import CompressConfig, Source, compress
from pice.shared.lora.compress.serve import shape_from_config


def sources_from_dir(root: Path) -> list[Source]:
    return [Source(d.name, d) for d in sorted(Path(root).iterdir())
            if (d / "adapter_config.json").is_file()]


def sources_from_catalog(state_dir: Path, base_model: str | None) -> tuple[list[Source], str]:
    """The catalog's adapters for one base model (the first one recorded when not given)."""
    path = Path(state_dir) / "adapters.json"
    if not path.is_file():
        raise BadRequestError(f"{path} does not exist (is --state a pice state dir?)",
                              field="state")
    records = [r for r in json.loads(path.read_text()).get("adapters", [])
               if not r.get("error")]
    bases = sorted({r["base_model"] for r in records})
    base = base_model or (bases[0] if bases else None)
    if base is None:
        raise BadRequestError(f"{path} lists no usable adapters", field="state")
    return [Source(f"{r['owner']}/{r['name']}", Path(state_dir) / r["dir"], r["owner"],
                   bool(r.get("public"))) for r in records if r["base_model"] == base], base


def store_dir(state_dir: Path, base_model: str) -> Path:
    """Where the server keeps the compressed store of one base model's adapters."""
    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in base_model)
    return Path(state_dir) / "compressed" / slug


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_adapters_parser(sub: Any) -> None:
    p = sub.add_parser("adapters", help="adapter tools (compress)")
    asub = p.add_subparsers(dest="adapters_cmd", required=True)
    c = asub.add_parser("compress", help="joint compression: one shared basis per cluster of "
                                         "adapters, a small Σ per adapter (Compress then Serve)")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--dir", type=Path, help="a directory of PEFT adapter directories")
    src.add_argument("--state", type=Path, help="a pice server state dir (its adapter catalog)")
    c.add_argument("--model", help="base model directory or spec (default: the catalog's)")
    c.add_argument("--out", type=Path, help="store directory (default: <state>/compressed/"
                                            "<model> with --state)")
    c.add_argument("--method", choices=["full", "diag"], default="full",
                   help="JD-Full (r x r Σ per adapter) or JD-Diag (r scales)")
    c.add_argument("--budget", type=float, default=0.3,
                   help="largest relative Frobenius error of any ΔW_i (default 0.3); adapters "
                        "over it stay uncompressed")
    c.add_argument("--ranks", default="4,8,16,32", help="candidate ranks")
    c.add_argument("--clusters", default="1,2,4,8,16,25", help="candidate cluster counts")
    c.add_argument("--share-tenant", action="append", default=[],
                   help="tenant opted in to bases shared with other tenants (repeatable)")
    c.add_argument("--max-rank", type=int, default=64, help="the engine's lora_max_rank")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(fn=cmd_compress)


def cmd_compress(args: Any) -> int:
    from pice.shared.models import resolve_model

    if args.state is not None:
        sources, base = sources_from_catalog(args.state, args.model)
        out = args.out or store_dir(args.state, base)
    else:
        if args.model is None or args.out is None:
            raise BadRequestError("--dir needs --model and --out", field="model")
        sources, base, out = sources_from_dir(args.dir), args.model, args.out
    if not sources:
        raise BadRequestError("no adapters to compress", field="dir")
    model_dir = Path(base) if Path(base).is_dir() else Path(resolve_model(base, None).path)
    cfg = CompressConfig(method=args.method, budget=args.budget, ranks=_ints(args.ranks),
                         clusters=_ints(args.clusters), share_tenants=args.share_tenant,
                         max_rank=args.max_rank, seed=args.seed)
    manifest = compress(sources, shape_from_config(model_dir), out, cfg,
                        progress=not args.no_progress)
    print(report(manifest))
    return 0


def report(manifest: dict[str, Any]) -> str:
    lines = [f"{'adapter':40} {'status':12} {'cluster':28} {'err max':>8}  note"]
    for name, a in sorted(manifest["adapters"].items()):
        err = a.get("error_max")
        note = "" if a["status"] == "compressed" else a.get("reason", "")
        lines.append(f"{name[:40]:40} {a['status']:12} {str(a.get('cluster') or '-')[:28]:28} "
                     f"{'-' if err is None else f'{err:.3f}':>8}  {note}")
    t = manifest["totals"]
    lines.append(f"{t['compressed']}/{t['adapters']} adapters compressed into {t['clusters']} "
                 f"cluster(s), {t['uncompressed']} left uncompressed; {t['seconds']:.1f} s; "
                 f"{t['bytes_before'] / 2**20:.2f} MiB -> {t['bytes_after'] / 2**20:.2f} MiB "
                 f"({t['bytes_saved'] / 2**20:.2f} MiB saved)")
    return "\n".join(lines)
