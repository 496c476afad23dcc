"""``kvlab show-mask``: render one layer's attention pattern (which keys each query sees) to a PNG, so a
window, sink tokens or BigBird's blocks can be seen rather than described."""

from __future__ import annotations

import torch

from kvlab.cli._args import int_range
from kvlab.errors import KvlabError

BYTES_PER_PAIR = 24  # the bool mask, the int64 positions it is computed from, the float image matplotlib draws


def add_parser(sub):
    p = sub.add_parser("show-mask", help="render a layer's attention pattern to a PNG",
                       description="Draw the causal attention pattern of one layer (query rows, key columns) "
                       "for a kvlab config, HF config.json, checkpoint folder or preset.")
    p.add_argument("config", nargs="?", help="kvlab config, HF config.json or checkpoint folder")
    p.add_argument("--preset", help="a built-in preset instead of CONFIG")
    p.add_argument("--layer", type=int_range(-2**31, 2**31), default=0, help="layer index (default 0)")
    p.add_argument("--seq", type=int_range(1, 2**31), default=64, help="sequence length drawn (default 64)")
    p.add_argument("--out", default="mask.png", help="image path: .png (added when no suffix), .pdf or .svg "
                   "(default mask.png)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return p


def attention_pattern(spec, seq: int) -> tuple[torch.Tensor, str]:
    """Bool ``[seq, seq]`` (True = query row attends key column) of a resolved layer spec, and a caption:
    the spec's own ``attention_pattern`` (each technique draws itself)."""
    return spec.attention_pattern(seq)


def run(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvlab.outputs import output_file
    from kvlab.planner import resolve_config
    from kvlab.safe_io import check_memory

    source = args.config or args.preset
    if not source:
        raise KvlabError("give CONFIG or --preset NAME")
    out = output_file(args.out, args.force, suffixes=(".png", ".pdf", ".svg"))  # the name really written
    check_memory(BYTES_PER_PAIR * args.seq**2, f"--seq {args.seq:,}: a {args.seq:,} x {args.seq:,} mask",
                 "draw fewer tokens")
    config = resolve_config(source)
    if not 0 <= args.layer < config.n_layers:
        raise KvlabError(f"--layer: must be in 0..{config.n_layers - 1}, got {args.layer}")
    spec = config.layer(args.layer)
    mask, caption = attention_pattern(spec, args.seq)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.imshow(mask.numpy(), cmap="Blues", interpolation="nearest", vmin=0, vmax=1)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    density = mask.sum().item() / (args.seq * (args.seq + 1) / 2)
    ax.set_title(f"layer {args.layer}: {caption}\n{density:.0%} of causal pairs", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    print(f"wrote {out} ({caption}, {args.seq} tokens, {density:.1%} of causal pairs)")
    return 0
