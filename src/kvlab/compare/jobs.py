"""The units of work of a comparison and their budget.

A comparison trains every variant once per seed on two tasks -- next-byte prediction on real text (for
perplexity) and multi-query associative recall (for long-range recall) -- and measures each variant's
cache bytes and speed once. A training job is a pure function of (config, budget, task, seed), so jobs
run in any order, in parallel worker processes, and their results are cached on disk: an interrupted
comparison resumes where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TASKS = ("lm", "recall")


@dataclass
class Budget:
    """What one comparison trains and measures. ``Budget()`` is the default run (about 15 minutes on a
    2-core CPU); ``Budget.quick()`` the test-sized one."""

    seeds: int = 2
    # multi-query associative recall: trained at length `seq`, measured at `recall_lengths`
    steps: int = 400
    batch: int = 32
    seq: int = 64
    pairs: int = 8
    alphabet: int = 12  # distinct keys, and as many values: chance is 1/alphabet
    lr: float = 2e-3
    recall_lengths: list[int] = field(default_factory=lambda: [32, 64, 128])
    recall_samples: int = 256
    # next-byte prediction on the corpus (default: this Python's standard library)
    lm_steps: int = 200
    lm_batch: int = 16
    lm_seq: int = 128
    lm_lr: float = 3e-3
    lm_chars: int = 4_000_000  # characters of each split read
    lm_windows: int = 64  # held-out windows of lm_seq tokens for perplexity
    corpus: str | None = None
    # cache bytes and speed, measured once per variant; speed at `speed_width` times the trained widths
    contexts: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    speed_width: int = 8
    long_context: int = 32768
    device: str = "cpu"
    workers: int = 2  # training processes run side by side (one thread each)

    @classmethod
    def quick(cls) -> Budget:
        return cls(seeds=1, steps=30, batch=16, lm_steps=20, lm_batch=8, lm_chars=400_000, lm_windows=8,
                   recall_lengths=[32, 64], recall_samples=32, contexts=[64, 128, 256], speed_width=1)

    def longest(self) -> int:
        """The longest sequence any job or measurement feeds a model (its ``max_seq_len`` must cover it)."""
        return max(*self.contexts, *self.recall_lengths, self.lm_seq, self.seq)

    def job_key(self, task: str) -> dict:
        """The budget fields a training job of ``task`` depends on (its cache key)."""
        recall = ("steps", "batch", "seq", "pairs", "alphabet", "lr", "recall_lengths", "recall_samples")
        lm = ("lm_steps", "lm_batch", "lm_seq", "lm_lr", "lm_chars", "lm_windows", "corpus")
        return {name: getattr(self, name) for name in (recall if task == "recall" else lm) + ("device",)}


def read_cached(path: Path, key: dict) -> dict | None:
    """The cached result at ``path`` if it was computed for ``key``, else None."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data["result"] if data.get("key") == key else None


def write_cached(path: Path, key: dict, result: dict) -> None:
    from kvlab.checkpoint import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"key": key, "result": result}, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def lm_data(budget: Budget) -> tuple[np.ndarray, np.ndarray]:
    """Byte ids of the corpus' train and validation splits (at most ``lm_chars`` characters each)."""
    from kvlab.data.corpus import load_corpus, split_ids
    from kvlab.tokenizer import ByteTokenizer

    corpus = load_corpus(budget.corpus, max_chars=budget.lm_chars)
    tok = ByteTokenizer()
    return split_ids(corpus, "train", tok).astype(np.uint8), split_ids(corpus, "val", tok).astype(np.uint8)


def train_job(config: dict, budget: Budget, task: str, seed: int, folder: str,
              data: tuple[np.ndarray, np.ndarray] | None = None, threads: int | None = None) -> dict:
    """Train ``config`` on ``task`` with ``seed`` into ``folder`` and evaluate it: perplexity on held-out
    text (lm) or recall accuracy at each length (recall). Runs in a worker process."""
    import time

    import torch

    from kvlab.config import ModelConfig
    from kvlab.eval.evaluate import perplexity, recall_by_length
    from kvlab.train.trainer import TrainConfig, Trainer

    started = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    if task == "recall":
        cfg = TrainConfig(steps=budget.steps, batch=budget.batch, seq=budget.seq, lr=budget.lr, task="recall",
                          recall_pairs=budget.pairs, recall_alphabet=budget.alphabet, recall_layout="fused",
                          seed=seed)
    else:
        cfg = TrainConfig(steps=budget.lm_steps, batch=budget.lm_batch, seq=budget.lm_seq, lr=budget.lm_lr,
                          seed=seed)
    cfg.warmup, cfg.eval_every, cfg.eval_batches, cfg.save_every = max(1, cfg.steps // 10), cfg.steps, 2, cfg.steps
    cfg.device = budget.device
    train_ids, val_ids = data if data is not None else (None, None)
    trainer = Trainer(ModelConfig.from_dict(config), cfg, folder, train_ids, val_ids, force=True, progress=False)
    last = trainer.run()
    model = trainer.model.eval()
    out = {"seed": seed, "task": task, "final_loss": last.get("loss"), "tok_s": last.get("mean_tok_s"),
           "params": model.num_parameters()}
    if task == "recall":
        accuracy = recall_by_length(model, cfg.recall_task(), budget.recall_lengths,
                                    n_samples=budget.recall_samples, seed=10_000 + seed)
        out["recall"] = {str(n): a for n, a in accuracy.items()}
    else:
        ppl = perplexity(model, val_ids, budget.lm_seq, max_windows=budget.lm_windows)
        out["bits_per_byte"] = ppl["bits_per_token"]
        out["by_position"] = ppl["by_position"]
    out["seconds"] = time.perf_counter() - started
    return out


def memory_job(config: dict, contexts: list[int], long_context: int, device: str = "cpu") -> dict:
    """Cache bytes of ``config`` measured after a prefill of each context, the planner's prediction at
    each, and the planner's bytes at ``long_context``."""
    import torch

    from kvlab.config import ModelConfig
    from kvlab.eval.evaluate import kv_bytes
    from kvlab.model import Model
    from kvlab.planner import plan

    model_config = ModelConfig.from_dict(config)
    torch.manual_seed(0)
    measured = kv_bytes(Model(model_config).to(device).eval(), contexts)
    return {"kv_bytes": {str(n): b for n, b in measured.items()},
            "planned_bytes": {str(n): plan(model_config, context=n).total_bytes for n in contexts},
            "long_context_bytes": plan(model_config, context=long_context).total_bytes}


def speed_job(configs: dict[str, dict], contexts: list[int], speed_width: int = 1, device: str = "cpu") -> dict:
    """Prefill seconds and decode tokens/s of every config widened ``speed_width`` times (random weights:
    speed does not depend on them), interleaved across configs so their ratios are fair, with the scaling
    exponents (slopes of log time against log context). Runs alone, for clean timings."""
    import time

    import torch

    from kvlab.compare.variants import widen
    from kvlab.config import ModelConfig
    from kvlab.eval.evaluate import scaling_exponent, speeds
    from kvlab.model import Model

    started = time.perf_counter()
    torch.manual_seed(0)
    models = {name: Model(ModelConfig.from_dict(widen(config, speed_width))).to(device).eval()
              for name, config in configs.items()}
    timing = speeds(models, contexts)
    out = {name: {"speed": {str(n): s for n, s in t.items()},
                  "prefill_exponent": scaling_exponent(contexts, [t[n]["prefill_s"] for n in contexts]),
                  "decode_exponent": scaling_exponent(contexts, [1 / t[n]["decode_tok_s"] for n in contexts])}
           for name, t in timing.items()}
    return {"variants": out, "seconds": time.perf_counter() - started}
