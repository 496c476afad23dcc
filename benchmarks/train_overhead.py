"""Training throughput of kvlab's ``Trainer`` against a plain PyTorch loop on the same model and data.

Both do one optimizer step per call (forward, cross-entropy, backward, clip, AdamW, schedule); the plain
loop gets pre-drawn batches, the trainer draws from its resumable sampler. Steps alternate between the two
(interleaved) so load drift hits both; the ratio of medians is the trainer's overhead (target: < 5%).

    python benchmarks/train_overhead.py            # d_model 128, 4 layers, batch 16 x 256 bytes
    python benchmarks/train_overhead.py --quick    # validation run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, median_spread, write_results  # noqa: E402

from kvlab import Model, ModelConfig  # noqa: E402
from kvlab.data.corpus import encode_texts, load_corpus  # noqa: E402
from kvlab.tokenizer import ByteTokenizer  # noqa: E402
from kvlab.train.trainer import TrainConfig, Trainer, lr_factor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    d_model, layers, batch, seq, repeats = (64, 2, 8, 128, 5) if args.quick else (128, 4, 16, 256, 20)
    config = ModelConfig.from_dict({"vocab_size": 256, "d_model": d_model, "n_layers": layers,
                                    "mlp_hidden": 11 * d_model // 4, "max_seq_len": seq,
                                    "layers": {"repeat": {"type": "full", "n_heads": 4}}})
    corpus = load_corpus(None, max_chars=4_000_000)
    train_ids = encode_texts(corpus.texts("train"), ByteTokenizer())
    val_ids = encode_texts(corpus.texts("val"), ByteTokenizer())
    cfg = TrainConfig(steps=10_000, batch=batch, seq=seq, warmup=10, eval_every=10_000, save_every=10_000)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, cfg, Path(tmp) / "run", train_ids, val_ids, progress=False)

        torch.manual_seed(cfg.seed)
        model = Model(config).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                      weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
        rng = np.random.default_rng(0)
        ids = torch.from_numpy(train_ids.astype(np.int64))
        batches = [ids[torch.from_numpy(rng.integers(0, len(ids) - seq - 1, batch))[:, None]
                       + torch.arange(seq + 1)] for _ in range(repeats + 2)]

        def plain() -> None:
            rows = batches[len(plain.seen) % len(batches)]
            plain.seen.append(1)
            logits = model(rows[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            float(loss.detach())

        plain.seen = []
        times = interleaved({"plain": plain, "kvlab": trainer.train_step}, repeats=repeats)
    tokens = batch * seq
    stats = {name: median_spread(samples) for name, samples in times.items()}
    ratio = stats["kvlab"]["median"] / stats["plain"]["median"]
    data = {"config": {"d_model": d_model, "n_layers": layers, "batch": batch, "seq": seq,
                       "params": model.num_parameters()},
            "seconds_per_step": stats, "tok_s": {k: tokens / v["median"] for k, v in stats.items()},
            "kvlab_over_plain": ratio}
    markdown = (f"# Trainer overhead\n\nModel d_model {d_model}, {layers} layers ({model.num_parameters():,} "
                f"params), batch {batch} x {seq} bytes, {repeats} interleaved steps each.\n\n"
                "| loop | tok/s (median) | s/step median [q1, q3] |\n|---|---|---|\n"
                + "".join(f"| {k} | {tokens / v['median']:,.0f} | {v['median']:.4f} [{v['q1']:.4f}, "
                          f"{v['q3']:.4f}] |\n" for k, v in stats.items())
                + f"\nkvlab / plain time per step: {ratio:.3f}\n")
    paths = write_results("train_overhead" + ("_quick" if args.quick else ""), data, markdown)
    print(markdown)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
