"""``kvlab plan``: exact KV-cache memory of a config at chosen contexts."""

from __future__ import annotations

import json

from kvlab.cli._args import byte_size, int_range, token_counts


def add_parser(sub):
    p = sub.add_parser("plan", help="KV-cache bytes of a config at given context lengths",
                       description="KV-cache bytes per token and in total, with the MHA-equivalent, for a "
                       "kvlab config, a Hugging Face config.json (or checkpoint folder), or a preset.")
    p.add_argument("config", nargs="?", help="kvlab config (.json/.yaml), HF config.json or checkpoint folder")
    p.add_argument("--preset", action="append", help="a built-in preset (see --list-presets); give several "
                   "(or a CONFIG and presets) to compare their KV bytes")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    p.add_argument("--context", type=token_counts, default=[4096, 32768, 131072],
                   help="comma-separated context lengths (K = 1024, M = 1024^2); default 4K,32K,128K")
    p.add_argument("--dtype", help="cache dtype (default: the config's; bf16 for presets)")
    p.add_argument("--batch", type=int_range(1, 2**31), default=1, help="sequences held at once (default 1)")
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
    presets = args.preset or []
    if not args.config and not presets:
        raise KvlabError("give CONFIG or --preset NAME (several to compare)")
    for name in presets:
        if name not in preset_names():
            raise KvlabError(f"preset {name!r} does not exist (presets: {', '.join(preset_names())})")
    sources = ([args.config] if args.config else []) + presets
    plans = []
    for source in sources:
        config = resolve_config(source)
        dtype = args.dtype or ("bfloat16" if source in presets else None)
        plans.append([plan(config, context=c, dtype=dtype, batch=args.batch, budget_bytes=args.budget)
                      for c in args.context])
    if args.json:
        dicts = [[r.to_dict(per_layer=args.per_layer) for r in results] for results in plans]
        print(json.dumps(dicts[0] if len(dicts) == 1 else {"plans": dicts, "ratios": _ratios(sources, plans)},
                         indent=2))
    else:
        print("\n\n".join(format_plan(results, per_layer=args.per_layer) for results in plans))
        if len(plans) > 1:
            print("\n" + _format_ratios(sources, plans))
    return 0


def _ratios(sources: list[str], plans: list) -> list[dict]:
    """KV bytes of every source relative to the first, per context."""
    first = plans[0]
    return [{"context": base.context, "name": sources[i], "bytes": results[k].total_bytes,
             "vs": sources[0], "ratio": results[k].total_bytes / base.total_bytes if base.total_bytes else None}
            for k, base in enumerate(first) for i, results in enumerate(plans) if i]


def _format_ratios(sources: list[str], plans: list) -> str:
    from kvlab.planner import human_bytes

    lines = [f"KV-cache bytes relative to {sources[0]}:"]
    for row in _ratios(sources, plans):
        ratio = row["ratio"]
        lines.append(f"{row['context']:>10,} tokens: {row['name']} {human_bytes(row['bytes'])} = "
                     + (f"{ratio:.3g}x {row['vs']} ({row['vs']} needs {1 / ratio:.1%} of it)" if ratio else "n/a"))
    return "\n".join(lines)
