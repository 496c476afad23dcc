"""``kvlab plan``: exact KV-cache memory of a config at chosen contexts."""

from __future__ import annotations

import json

from kvlab.cli._args import byte_size, token_counts


def add_parser(sub):
    p = sub.add_parser("plan", help="KV-cache bytes of a config at given context lengths",
                       description="KV-cache bytes per token and in total, with the MHA-equivalent, for a "
                       "kvlab config, a Hugging Face config.json (or checkpoint folder), or a preset.")
    p.add_argument("config", nargs="?", help="kvlab config (.json/.yaml), HF config.json or checkpoint folder")
    p.add_argument("--preset", help="a built-in preset (see --list-presets)")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    p.add_argument("--context", type=token_counts, default=[4096, 32768, 131072],
                   help="comma-separated context lengths (K = 1024, M = 1024^2); default 4K,32K,128K")
    p.add_argument("--dtype", help="cache dtype (default: the config's; bf16 for presets)")
    p.add_argument("--batch", type=int, default=1, help="sequences held at once (default 1)")
    p.add_argument("--budget", type=byte_size, help="memory for weights + caches (e.g. 80GiB): how many "
                   "sequences fit")
    p.add_argument("--per-layer", action="store_true", help="add a per-layer breakdown")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def run(args) -> int:
    from kvlab.errors import KvlabError
    from kvlab.planner import format_plan, plan, preset_names, resolve_config

    if args.list_presets:
        print("\n".join(preset_names()))
        return 0
    if bool(args.config) == bool(args.preset):
        raise KvlabError("give exactly one of CONFIG or --preset NAME")
    source = args.config or args.preset
    if args.preset and args.preset not in preset_names():
        raise KvlabError(f"preset {args.preset!r} does not exist (presets: {', '.join(preset_names())})")
    config = resolve_config(source)
    dtype = args.dtype or ("bfloat16" if args.preset else None)
    results = [plan(config, context=c, dtype=dtype, batch=args.batch, budget_bytes=args.budget)
               for c in args.context]
    if args.json:
        print(json.dumps([r.to_dict(per_layer=args.per_layer) for r in results], indent=2))
    else:
        print(format_plan(results, per_layer=args.per_layer))
    return 0
