"""The rows and the budget of ``kvlab compare --base``: which conversion each row is (as ``kvlab convert
--to`` steps), the claim from the issue's table it is measured against, and how many tokens and which
contexts one run spends."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvlab.errors import KvlabError

PLANS = Path(__file__).resolve().parents[3] / "docs" / "convert"

# claim: (technique in the table, claimed memory reduction, claimed perplexity drop)
CLAIMS = {
    "mqa": ("KV sharing, 4x", "75%", "< 0.5%"),
    "mla": ("multi-head compression, 8x", "87.5%", "1-2%"),
    "sliding": ("sliding window, W = 4096", "50% at 8K", "2-3% on long-range tasks"),
    "block_sparse": ("sparse attention (BigBird)", "60-80%", "1-3%"),
    "deltanet": ("linear attention (Mamba)", "90%+", "3-5% on retrieval"),
}


@dataclass(frozen=True)
class Row:
    name: str
    spec: str  # a `kvlab convert --to` SPEC, or "plan:FILE" (a committed per-layer plan), or "hybrid:K"
    claim: str | None  # key of CLAIMS
    note: str = ""


ROWS = (
    Row("MQA (fit merge)", "mqa", "mqa", "SmolLM2 has 3 KV heads, so MQA is 3x, not 4x"),
    Row("MLA 12.5%", "mla:rank=40,rope=8", "mla", "rank 40 + 8 RoPE dims: 12.5% of the source's bytes"),
    Row("sliding W4096 + 4 sinks", "sliding:window=4096,sinks=4", "sliding", "halves the cache at 8K"),
    Row("block-sparse local + global", "block_sparse", "block_sparse", "block 64, 8 local blocks, 1 global"),
    Row("gated DeltaNet (all layers)", "deltanet", "deltanet", "every layer replaced"),
    Row("gated DeltaNet hybrid (1 in 6 full)", "hybrid:6", "deltanet", "layers 0, 6, 12, 18, 24 kept full"),
    Row("int8 KV", "int8", None),
    Row("int4 KV", "int4", None),
    Row("convert budget 25%", "plan:smollm2-b25/plan.json", None, "committed per-layer plan"),
    Row("convert budget 10%", "plan:smollm2-b10/plan.json", None, "committed per-layer plan"),
)


def row_key(row: Row) -> dict:
    """What a row's jobs depend on: its spec (and a plan file's per-layer steps)."""
    from kvlab.convert.spec import load_plan_file

    if row.spec.startswith("plan:"):
        return {"spec": row.spec, "layers": load_plan_file(PLANS / row.spec[5:])["layers"]}
    return {"spec": row.spec}


def row_steps(row: Row, n_layers: int) -> list:
    """Per-layer convert steps of ``row`` (kvlab.convert.spec's parser, the same as ``kvlab convert --to``)."""
    from kvlab.convert.spec import parse_layer_spec, resolve_spec

    if row.spec.startswith("plan:"):
        path = PLANS / row.spec[5:]
        if not path.is_file():
            raise KvlabError(f"{row.name}: the committed plan {path} is missing")
        return resolve_spec(str(path), n_layers)[0]
    if row.spec.startswith("hybrid:"):
        every = int(row.spec[7:])
        return [parse_layer_spec("keep" if i % every == 0 else "deltanet") for i in range(n_layers)]
    return resolve_spec(row.spec, n_layers)[0]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


@dataclass
class BaseBudget:
    """Tokens and contexts of one ``kvlab compare --base`` run. ``BaseBudget.named("default")`` fits
    ``make demo`` on 2 CPU cores; ``scaled(x)`` multiplies tokens and contexts for bigger machines."""

    calib_len: int = 1024  # one calibration sequence, shared by every row
    eval_samples: int = 2  # disjoint held-out samples: the spread
    eval_len: int = 512
    chunk: int = 128  # prefill chunk appended to the cache, as decoding sees it
    heal_tokens: int = 1024  # 4 steps of 1 x 256: the steep start of the layer-local curve
    heal_seq: int = 256
    heal_stage: str = "local"  # kvlab heal --stage: local (layer-local transfer, cheapest), kl or both
    heal_seeds: int = 2  # independent heals per row (data order, init): the healed spread covers them
    needle_contexts: list[int] = field(default_factory=lambda: [512, 2048, 8192])
    needle_depths: list[float] = field(default_factory=lambda: [0.5])
    needle_gate: int | None = 2048  # longer contexts only for the models that found a key here (None: all)
    speed_lengths: list[int] = field(default_factory=lambda: [512, 2048, 8192])
    speed_layers: int = 10  # complexity: every k-th layer of each row (random weights)
    memory_context: int = 8192
    serve_context: int = 2048  # serving at a KV budget: one of the passkey contexts (its cache is reused)
    serve_gib: float = 2.0  # the KV budget
    serve_max_batch: int = 64  # cap on the measured batch (CPU time and memory)
    serve_steps: int = 2  # timed whole-batch decode steps (after one warm-up)
    max_chars: int = 600_000
    rows: list[str] | None = None  # row names (None: all)
    name: str = "default"

    @classmethod
    def named(cls, name: str) -> BaseBudget:
        if name == "quick":
            return cls(calib_len=256, eval_samples=2, eval_len=128, chunk=64, heal_tokens=128, heal_seq=128,
                       needle_contexts=[128, 256], needle_depths=[0.5], needle_gate=None, serve_context=256, speed_lengths=[128, 512], speed_layers=30,
                       max_chars=200_000, rows=["MQA (fit merge)", "int4 KV"], heal_seeds=1, name="quick")
        if name == "default":
            return cls()
        if name == "small":
            return cls.named("default").scaled(0.5, "small")
        if name == "large":
            return cls.named("default").scaled(4.0, "large")
        try:
            factor = float(name)
        except ValueError:
            raise KvlabError(f"--budget: expected quick, small, default, large or a multiplier, got {name!r}") from None
        if not 0 < factor <= 64:
            raise KvlabError(f"--budget: multiplier must be in (0, 64], got {name!r}")
        return cls.named("default").scaled(factor, name)

    def scaled(self, factor: float, name: str) -> BaseBudget:
        """Tokens times ``factor``; with ``factor >= 2`` the needle runs at 512 to 8K for every model at 3 depths."""
        out = BaseBudget(**{**asdict(self), "name": name})
        out.eval_len = max(64, int(self.eval_len * factor))
        out.heal_tokens = max(out.heal_seq, int(self.heal_tokens * factor))
        out.calib_len = max(256, min(4096, int(self.calib_len * factor)))
        if factor >= 2:
            out.needle_contexts = [512, 1024, 2048, 4096, 8192]
            out.needle_depths = [0.1, 0.5, 0.9]
            out.needle_gate = None
            out.heal_stage = "both"
            out.speed_lengths = [512, 1024, 2048, 4096, 8192]
            out.max_chars = int(self.max_chars * factor)
        elif factor < 1:
            out.needle_contexts = [min(self.needle_contexts)]
        if out.serve_context not in out.needle_contexts:
            out.serve_context = max(n for n in out.needle_contexts if out.needle_gate is None or n <= out.needle_gate)
        return out

    def key(self, *names: str) -> dict:
        return {n: getattr(self, n) for n in names}
