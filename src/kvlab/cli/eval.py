"""``kvlab eval``: perplexity on held-out text (overall and by position), recall accuracy by length,
measured KV bytes and prefill / decode speed at several contexts, for a checkpoint folder, a GGUF file
or a named model (``kvlab eval smollm2-135m``: perplexity in nats/token and bits/byte)."""

from __future__ import annotations

from pathlib import Path

from kvlab.cli._args import add_dtype_arg, check_new_file, int_range, positive_int, token_counts
from kvlab.data.recall import LAYOUTS


def add_parser(sub):
    p = sub.add_parser("eval", help="perplexity, recall, KV bytes and speed of a checkpoint",
                       description="Evaluate a kvlab (or HF) checkpoint folder: held-out perplexity and "
                       "perplexity by position bucket, recall accuracy by length, measured cache bytes and "
                       "prefill seconds / decode tokens/s at several contexts.")
    p.add_argument("checkpoint", help="checkpoint folder (e.g. RUN_DIR/checkpoint), GGUF file or named model")
    p.add_argument("--corpus", help="held-out text: file, folder or JSONL (default: the stdlib test split)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="corpus split (default test)")
    p.add_argument("--max-chars", type=positive_int, default=2_000_000, help="characters of the split to read")
    p.add_argument("--seq", type=int_range(1, 2**31), default=256, help="perplexity window length (default 256)")
    p.add_argument("--windows", type=int_range(1, 2**20), default=16, help="perplexity windows (default 16)")
    p.add_argument("--no-ppl", action="store_true", help="skip perplexity (e.g. a recall-task model)")
    p.add_argument("--recall-lengths", type=token_counts, help="recall accuracy at these sequence lengths")
    p.add_argument("--recall-pairs", type=positive_int, default=8, help="key-value pairs per recall row (default 8)")
    p.add_argument("--recall-alphabet", type=int_range(2), help="distinct keys/values (default: as the vocab allows)")
    p.add_argument("--recall-layout", choices=LAYOUTS, default="pairs",
                   help="pairs (k v tokens, default) or fused (one token per pair)")
    p.add_argument("--context", type=token_counts, default=None,
                   help="contexts for KV bytes and speed (default: those of 64,256,1024 the model holds)")
    p.add_argument("--decode-steps", type=int_range(1, 2**20), default=16, help="decode steps timed per context")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--out", help="also write the JSON result to this file")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    add_dtype_arg(p)
    return p


def run(args) -> int:
    import torch

    from kvlab.checkpoint import atomic_write
    from kvlab.eval import evaluate as ev
    from kvlab.loading import load
    from kvlab.runtime_dtype import resolve_dtype
    from kvlab.safe_io import dumps_finite

    if args.out:
        check_new_file(args.out, args.force)
    torch.manual_seed(0)
    model = load(args.checkpoint, dtype=resolve_dtype(args.dtype, args.checkpoint)).eval()
    _check_lengths(args, model.config.max_seq_len)
    result: dict = {"checkpoint": str(args.checkpoint), "params": model.num_parameters()}
    if not args.no_ppl:
        from kvlab.data.corpus import encode_texts, load_corpus
        from kvlab.tokenizer import load_tokenizer, token_byte_lengths

        tok = load_tokenizer(args.checkpoint, model.config.vocab_size)
        texts = load_corpus(args.corpus, max_chars=args.max_chars).texts(args.split)
        result["perplexity"] = ev.perplexity(model, encode_texts(texts, tok), args.seq, args.windows,
                                             token_bytes=token_byte_lengths(tok))
    if args.recall_lengths:
        from kvlab.data.recall import RecallTask

        task = RecallTask(args.recall_pairs, args.recall_alphabet, args.recall_layout)
        result["recall"] = ev.recall_by_length(model, task, args.recall_lengths)
    result["kv_bytes"] = ev.kv_bytes(model, args.context)
    result["speed"] = ev.speed(model, args.context, args.decode_steps)
    ctx = list(result["speed"])
    result["prefill_exponent"] = ev.scaling_exponent(ctx, [result["speed"][n]["prefill_s"] for n in ctx])
    result["decode_exponent"] = ev.scaling_exponent(ctx, [1 / result["speed"][n]["decode_tok_s"] for n in ctx])
    text = dumps_finite(result, indent=2)  # a NaN is refused, never reported
    if args.out:
        atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(text))
    print(text if args.json else ev.format_report(result))
    return 0


def _check_lengths(args, max_seq_len: int) -> None:
    """Every length asked for fits the model (a longer window or context is refused, not extrapolated)."""
    from kvlab.errors import KvlabError

    if args.context is None:
        args.context = [n for n in (64, 256, 1024) if n <= max_seq_len] or [max_seq_len]
    asked = [("--seq", (0 if args.no_ppl else args.seq)), ("--context", max(args.context)),
             ("--recall-lengths", max(args.recall_lengths or [0]))]
    for flag, length in asked:
        if length > max_seq_len:
            raise KvlabError(f"{flag}: {length:,} tokens exceed the model's max_seq_len ({max_seq_len:,})")
