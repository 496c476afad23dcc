"""``kvlab generate``: sample from a kvlab or Hugging Face checkpoint, a GGUF file or a named model;
``--chat`` wraps the prompt in the model's chat template. One prompt streams to the terminal as it
is generated; generation stops at the tokenizer's stop tokens (eos, end of turn) and any ``--stop``."""

from __future__ import annotations

import contextlib
import sys

from kvlab.cli._args import add_dtype_arg, float_range, int_range, nonneg_int, seed_int


def add_parser(sub):
    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("checkpoint", help="kvlab or Hugging Face checkpoint folder, GGUF file or named model "
                   "(kvlab models)")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--ids", action="append", help="prompt as comma-separated token ids (repeatable)")
    p.add_argument("--max-new-tokens", type=nonneg_int, default=64)
    p.add_argument("--temperature", type=float_range(0.0, 1e6), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=nonneg_int, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float_range(0.0, 1.0, low_open=True), help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=seed_int)
    p.add_argument("--stop", type=int_range(0, 2**40), action="append", default=[], help="stop token id (repeatable)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to each --prompt")
    p.add_argument("--system", help="system message for --chat (default: the template's own)")
    p.add_argument("--packed", action="store_true",
                   help="run the hot-path linears through oneDNN on packed weight copies where this machine "
                        "measures that faster (CPU fp32, and bf16 where oneDNN has native bf16; one more copy of those "
                        "weights while generating; with --dtype auto, bf16 is measured packed too)")
    add_dtype_arg(p)
    return p


def run(args) -> int:
    import kvlab
    from kvlab.errors import KvlabError
    from kvlab.runtime_dtype import resolve_dtype
    from kvlab.tokenizer import StreamDecoder, load_tokenizer

    batch = len(args.ids or args.prompt or [None])  # decode runs this many rows at a time
    model = kvlab.load(args.checkpoint, dtype=resolve_dtype(args.dtype, args.checkpoint, batch, args.packed)).eval()
    tokenizer = load_tokenizer(args.checkpoint, model.config.vocab_size)
    if args.ids:
        try:
            prompts = [[int(t) for t in ids.split(",")] for ids in args.ids]
        except ValueError:
            raise KvlabError("--ids: expected comma-separated integers") from None
    elif args.prompt and args.chat:
        if not hasattr(tokenizer, "apply_chat_template"):
            raise KvlabError("--chat: this checkpoint has no chat template (byte-level tokenizer)")
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [tokenizer.encode(tokenizer.apply_chat_template(system + [{"role": "user", "content": p}]))
                   for p in args.prompt]
    elif args.prompt:
        for text in args.prompt:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise KvlabError("--prompt: not valid UTF-8 text (give raw token ids with --ids)") from None
        prompts = [tokenizer.encode(p) for p in args.prompt]
    else:
        raise KvlabError("give --prompt TEXT or --ids 1,2,3")
    for ids in prompts:
        if not ids or max(ids) >= model.config.vocab_size or min(ids) < 0:
            raise KvlabError(f"prompt token ids must be in [0, {model.config.vocab_size})")
        if len(ids) + args.max_new_tokens > model.config.max_seq_len:
            raise KvlabError(f"prompt ({len(ids)} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds the "
                             f"model's max_seq_len ({model.config.max_seq_len})")
    stream = None
    if len(prompts) == 1:
        decoder = StreamDecoder(tokenizer)

        def stream(tokens):
            if tokens[0] is not None:
                sys.stdout.write(decoder.push(tokens[0]))
                sys.stdout.flush()
    stops = sorted(set(args.stop) | set(getattr(tokenizer, "stop_ids", ())))
    with model.packed_linears() if args.packed else contextlib.nullcontext():
        result = model.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=stops,
                                stream=stream)
    if stream is None:
        for prompt, new in zip(prompts, result.tokens):
            print(repr(tokenizer.decode(new) if args.chat else tokenizer.decode(prompt) + tokenizer.decode(new)))
    else:
        print(flush=True)
    s = result.stats
    rate = "n/a" if s.decode_tokens_per_s is None else f"{s.decode_tokens_per_s:.1f}"
    print(f"[prefill {s.prompt_tokens} tokens in {s.prefill_seconds:.3f}s, decode {rate} "
          f"tok/s, peak cache {s.peak_cache_bytes:,} B]", file=sys.stderr)
    return 0
