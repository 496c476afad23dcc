"""``kvlab train``: train a kvlab config from scratch on a text corpus (default: the Python standard
library of this interpreter) or on the synthetic recall task. ``torchrun --nproc_per_node N -m kvlab
train ...`` trains data-parallel (one process per device; gloo on CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

from kvlab.cli._args import float_range, int_range, nonneg_int, positive_float, positive_int, seed_int
from kvlab.data.recall import LAYOUTS
from kvlab.train.trainer import TrainConfig

# CLI flag -> TrainConfig field; None defaults mean "the saved value on --resume, else the dataclass default"
_FIELDS = {"steps": positive_int, "batch": int_range(1, 2**31), "seq": int_range(1, 2**31), "lr": positive_float,
           "warmup": nonneg_int, "grad_accum": positive_int, "clip": positive_float,
           "weight_decay": float_range(0.0, 10.0), "eval_every": positive_int, "eval_batches": positive_int,
           "save_every": positive_int, "seed": seed_int, "task": str, "recall_pairs": positive_int,
           "recall_alphabet": int_range(2), "recall_layout": str, "device": str}


def add_parser(sub):
    p = sub.add_parser("train", help="train a config from scratch (text corpus or recall task)",
                       description="Train a kvlab config with AdamW (warmup + cosine), clipping and "
                       "accumulation; checkpoints to RUN_DIR/checkpoint, log to RUN_DIR/log.jsonl. Under "
                       "torchrun, trains data-parallel.")
    p.add_argument("--config", help="kvlab model config (.json/.yaml); not needed with --resume")
    p.add_argument("--out", required=True, help="run folder (refused if it exists, unless --force/--resume)")
    p.add_argument("--corpus", help="text file, folder of text files, or JSONL with a \"text\" field "
                   "(default: this Python's standard library)")
    p.add_argument("--tokenizer", default=None, help="byte (default), bpe (trained here and cached), or a "
                   "folder/file holding a tokenizer.json; the model's vocab_size follows the tokenizer")
    p.add_argument("--vocab", type=int_range(257, 2**22), help="BPE vocabulary size (default 8192)")
    p.add_argument("--max-chars", type=positive_int, help="use at most this many characters per corpus split")
    for name, kind in _FIELDS.items():
        flag = "--" + name.replace("_", "-")
        if name == "task":
            p.add_argument(flag, choices=["lm", "recall"], default=None, help="lm (default) or recall (MQAR)")
        elif name == "recall_layout":
            p.add_argument(flag, choices=LAYOUTS, default=None,
                           help="recall rows: pairs (k v tokens, default) or fused (one token per pair)")
        else:
            p.add_argument(flag, type=kind, default=None, help=f"default {getattr(TrainConfig, name)}")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast")
    p.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--stop-after", type=positive_int, help="stop after this many steps in this invocation (the "
                   "schedule still targets --steps; resume later)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    from kvlab.config import ModelConfig, read_config_file
    from kvlab.errors import KvlabError
    from kvlab.train.trainer import CHECKPOINT, Trainer

    out = Path(args.out)
    saved: dict = {}
    if args.resume:
        if args.force:
            raise KvlabError("--resume continues the run in --out and --force replaces it: give one of them")
        if not (out / "train_config.json").exists():
            raise KvlabError(f"{out}: not a kvlab run folder (no train_config.json)")
        saved = read_config_file(out / "train_config.json")
        config_source = out / CHECKPOINT
        if not (config_source / "config.json").exists():
            config_source = out / ".checkpoint.old"
        _refuse_changes(args, saved, config_source)
    elif not args.config:
        raise KvlabError("--config is required (unless --resume)")
    else:
        config_source = Path(args.config)
    values = dict(saved.get("train", {}))
    for name in [*_FIELDS, "compile", "bf16"]:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    cfg = TrainConfig.from_dict(values)
    cfg.validate()
    config_data = read_config_file(config_source)
    corpus = str(Path(args.corpus).resolve()) if args.corpus else None  # resumable from any folder
    meta = {"config": str(config_source), "corpus": saved.get("corpus", corpus),
            "tokenizer": saved.get("tokenizer", args.tokenizer or "byte"),
            "vocab": saved.get("vocab", args.vocab or 8192), "max_chars": saved.get("max_chars", args.max_chars)}
    train_ids = val_ids = tokenizer_file = None
    if cfg.task == "lm":
        tokenizer, train_ids, val_ids, tokenizer_file = prepare_lm(
            meta["corpus"], meta["tokenizer"], meta["vocab"], meta["max_chars"],
            resume_tokenizer=out / CHECKPOINT / "tokenizer.json" if args.resume else None)
        if config_data.get("vocab_size") != tokenizer.vocab_size:
            config_data = {**config_data, "vocab_size": tokenizer.vocab_size}
    config = ModelConfig.from_dict(config_data)
    trainer = Trainer(config, cfg, out, train_ids, val_ids, force=args.force, resume=args.resume,
                      tokenizer_file=tokenizer_file, meta=meta, progress=not args.no_progress)
    last = trainer.run(stop_after=args.stop_after)
    if trainer.rank == 0:
        parts = [f"step {trainer.step}/{cfg.steps}"] + [f"{k} {last[k]:.4g}" for k in
                                                        ("loss", "val_loss", "recall_acc", "mean_tok_s") if k in last]
        print(f"{', '.join(parts)}; checkpoint {out / CHECKPOINT}", file=sys.stderr)
    if trainer.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _refuse_changes(args, saved: dict, config_source: Path) -> None:
    """A resumed run keeps its model, data and tokenizer: a flag that asks for another one is refused
    (rather than silently ignored). Training flags (--steps, --lr, ...) may change."""
    from kvlab.config import ModelConfig, read_config_file
    from kvlab.errors import KvlabError

    if args.config:
        mine = ModelConfig.from_dict(read_config_file(args.config)).to_dict()
        theirs = ModelConfig.from_dict(read_config_file(config_source)).to_dict()
        if saved.get("train", {}).get("task", "lm") == "lm":  # the tokenizer sets the vocabulary
            mine["vocab_size"] = theirs["vocab_size"]
        if mine != theirs:
            changed = sorted(k for k in theirs if mine.get(k) != theirs.get(k))
            raise KvlabError(f"--config: differs from the run's config ({', '.join(changed)}); a resumed run keeps "
                             "its config: drop --config, or start a new run")
    given = {"corpus": str(Path(args.corpus).resolve()) if args.corpus else None, "tokenizer": args.tokenizer,
             "vocab": args.vocab, "max_chars": args.max_chars}
    for name, value in given.items():
        if value is not None and value != saved.get(name):
            flag = "--" + name.replace("_", "-")
            raise KvlabError(f"{flag}: the run in {args.out} used {saved.get(name)!r}, not {value!r}; a resumed run "
                             f"keeps its data: drop {flag}, or start a new run")


def prepare_lm(corpus: str | None, tokenizer: str, vocab: int, max_chars: int | None,
               resume_tokenizer: Path | None = None):
    """``(tokenizer, train_ids, val_ids, tokenizer_file | None)`` for the language-model task. A resumed
    run reuses the tokenizer saved in its checkpoint."""
    from kvlab.data.corpus import cap_texts, load_corpus, split_ids
    from kvlab.errors import KvlabError
    from kvlab.tokenizer import ByteTokenizer, JsonTokenizer, train_bpe

    data = load_corpus(corpus, max_chars=max_chars)
    if resume_tokenizer is not None and resume_tokenizer.exists():
        tok = JsonTokenizer(resume_tokenizer)
    elif tokenizer == "byte":
        tok = ByteTokenizer()
    elif tokenizer == "bpe":
        tok = train_bpe(cap_texts(data.texts("train"), 16_000_000), vocab_size=vocab)  # merges settle early
    else:
        path = Path(tokenizer)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.exists():
            raise KvlabError(f"--tokenizer: {tokenizer} is neither byte, bpe nor a tokenizer.json (folder)")
        tok = JsonTokenizer(path)
    return tok, split_ids(data, "train", tok), split_ids(data, "val", tok), getattr(tok, "path", None)

