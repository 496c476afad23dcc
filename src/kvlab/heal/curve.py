"""The quality-versus-tokens curve of a heal run: KL to the teacher and perplexity against healing
tokens, per stage, read from each stage's ``log.jsonl`` (the records that carry fidelity metrics)."""

from __future__ import annotations

import json
from pathlib import Path


def curve_points(out: Path, stages: list[str], start: dict, tokens_per_step: dict[str, int]) -> list[dict]:
    """``[{stage, step, tokens, kl, ppl}, ...]``: the unhealed student first (tokens 0), then every
    evaluation of each stage; tokens count from the start of healing, across stages."""
    points = [{"stage": "start", "step": 0, "tokens": 0, "kl": start["kl"], "ppl": start["ppl"]}]
    offset = 0
    for stage in stages:
        log = out / stage / "log.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
        last_step = 0
        for record in records:
            last_step = record["step"]
            if "kl" in record:
                points.append({"stage": stage, "step": record["step"],
                               "tokens": offset + record["step"] * tokens_per_step[stage],
                               "kl": record["kl"], "ppl": record["ppl"], "val_loss": record.get("val_loss")})
        offset += last_step * tokens_per_step[stage]
    return points


def plot_curve(points: list[dict], teacher_ppl: float, path: Path, title: str) -> None:
    """Two panels (KL, perplexity; log scale) against healing tokens, one line per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_ppl) = plt.subplots(1, 2, figsize=(10, 4))
    previous = points[0]  # each stage's line starts where the one before ended
    for stage in [s for s in dict.fromkeys(p["stage"] for p in points) if s != "start"]:
        mine = [previous] + [p for p in points if p["stage"] == stage]
        previous = mine[-1]
        for ax, key in ((ax_kl, "kl"), (ax_ppl, "ppl")):
            ax.plot([p["tokens"] for p in mine], [p[key] for p in mine], marker="o", label=stage)
    ax_ppl.axhline(teacher_ppl, color="gray", linestyle="--", label=f"teacher {teacher_ppl:.2f}")
    ax_ppl.axhline(teacher_ppl * 1.1, color="gray", linestyle=":", label="teacher + 10%")
    for ax, label in ((ax_kl, "KL(teacher || student), nats/token"), (ax_ppl, "perplexity (through the cache)")):
        ax.set_xlabel("healing tokens")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
