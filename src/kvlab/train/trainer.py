"""The training loop: AdamW, warmup + cosine, gradient clipping and accumulation, periodic validation,
atomic checkpoints that resume bit-exactly, a JSONL log, and data parallelism under ``torchrun``.

Run folder layout::

    RUN_DIR/train_config.json   the TrainConfig plus where the data came from
    RUN_DIR/log.jsonl           one record per step (loss, lr, tok/s) and per validation
    RUN_DIR/checkpoint/         config.json + model.safetensors (a kvlab checkpoint: ``kvlab.load`` reads it)
                                + trainer_state.json/.safetensors (optimizer, scheduler, RNG states, data
                                  position, step: no pickle, see ``state.py``)
                                + tokenizer.json when the run used one
    RUN_DIR/.kvlab-manifest.json  the files above: ``--force`` removes those and nothing else

A checkpoint is written to ``RUN_DIR/.checkpoint.tmp`` and swapped in by renaming folders, so a crash
leaves either the previous checkpoint or the new one, never a mix. A non-finite loss stops the run before
the update that would spread it, keeping the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kvlab.config import ModelConfig
from kvlab.data.corpus import ChunkSampler
from kvlab.data.recall import RecallStream, recall_accuracy
from kvlab.errors import KvlabError
from kvlab.safe_io import available_memory
from kvlab.train import state as state_io
from kvlab.train.config import TrainConfig, check_device, estimate_train_bytes, lr_factor  # noqa: F401

CHECKPOINT = "checkpoint"
STATE = state_io.JSON
CHECKPOINT_FILES = ("config.json", "model.safetensors", state_io.JSON, state_io.TENSORS, "tokenizer.json",
                    "tokenizer_config.json")
RUN_FILES = ("train_config.json", "log.jsonl", *(f"{folder}/{name}" for folder in (CHECKPOINT, ".checkpoint.tmp",
             ".checkpoint.old") for name in CHECKPOINT_FILES))


# ---- the trainer --------------------------------------------------------------------------------------
class Trainer:
    """Trains ``model_config`` into ``out_dir``. ``train_ids`` / ``val_ids`` are token-id arrays for the
    language-model task (unused for ``task="recall"``). ``resume`` continues the run in ``out_dir``. Hooks:
    start from ``model``; train only parameters named ``trainable(name)``; ``objective(model)`` is the module
    DDP wraps, its ``forward(batch)`` the loss (default: next tokens); ``eval_hook(model)`` adds metrics."""

    def __init__(self, model_config: ModelConfig, cfg: TrainConfig, out_dir: str | Path,
                 train_ids: np.ndarray | None = None, val_ids: np.ndarray | None = None, *,
                 force: bool = False, resume: bool = False, tokenizer_file: str | Path | None = None,
                 meta: dict | None = None, progress: bool = True, model: torch.nn.Module | None = None,
                 trainable: Callable[[str], bool] | None = None, objective: Callable | None = None,
                 eval_hook: Callable | None = None, desc: str = "train"):
        cfg.validate()
        self.cfg, self.out, self.eval_hook, self.desc = cfg, Path(out_dir), eval_hook, desc  # desc: bar label
        self.meta, self.progress, self.tokenizer_file = meta or {}, progress, tokenizer_file
        self.rank, self.world = self._init_distributed()
        self.device = torch.device(cfg.device if cfg.device != "cuda" or self.world == 1
                                   else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        from kvlab.model import Model, count_parameters

        need = estimate_train_bytes(model_config, count_parameters(model_config), cfg.batch // self.world, cfg.seq)
        have = available_memory(self.device)
        if need > have:
            raise KvlabError(f"batch {cfg.batch} x seq {cfg.seq} needs about {need / 2**30:.1f} GiB to train, "
                             f"more than the {have / 2**30:.1f} GiB available; lower --batch/--seq or raise "
                             f"--grad-accum")
        if cfg.seq > model_config.max_seq_len:
            raise KvlabError(f"seq {cfg.seq} exceeds the config's max_seq_len {model_config.max_seq_len}")
        self.train_data, self.val_data = self._streams(model_config, train_ids, val_ids)
        self._prepare_folder(force, resume)  # only after every check: a refused run deletes nothing
        torch.manual_seed(cfg.seed)
        self.model = (Model(model_config) if model is None else model).to(self.device).train()
        params = [p for name, p in self.model.named_parameters() if trainable is None or trainable(name)]
        for p in self.model.parameters():  # the others are frozen (an empty selection: AdamW refuses)
            p.requires_grad_(any(p is q for q in params))
        decay = [p for p in params if p.dim() >= 2]
        other = [p for p in params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": other, "weight_decay": 0.0}],
                                           lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.step, self.saved_step = 0, None
        if resume:
            self._load_state()
        self.objective = None if objective is None else objective(self.model)
        self.net = self.core = self.model if self.objective is None else self.objective  # the loss's module
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.core, device_ids=[self.device.index]
                                               if self.device.type == "cuda" else None)
        if cfg.compile:
            self.net = torch.compile(self.net)

    # ---- setup ----------------------------------------------------------------------------------
    @staticmethod
    def _init_distributed() -> tuple[int, int]:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return 0, 1
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and os.environ.get("KVLAB_BACKEND") != "gloo" else "gloo"
            dist.init_process_group(backend)
        return dist.get_rank(), dist.get_world_size()

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _prepare_folder(self, force: bool, resume: bool) -> None:
        from kvlab.outputs import check_output_dir, prepare_output_dir

        out = self.out
        if resume:
            if not any((out / name / legacy).exists() for name in (CHECKPOINT, ".checkpoint.old")
                       for legacy in (STATE, "trainer.pt")):
                raise KvlabError(f"{out}: no checkpoint to resume from")
        else:  # a folder without kvlab's manifest is never deleted; with it, only the files it lists
            check_output_dir(out, force, "run folder", hint=" or --resume to continue")
        self._barrier()  # every rank has checked before rank 0 changes anything
        if self.rank == 0 and not resume:
            prepare_output_dir(out, force, RUN_FILES, "run folder")
            record = {"train": dataclasses.asdict(self.cfg), **self.meta}
            (out / "train_config.json").write_text(json.dumps(record, indent=2) + "\n")
        self._barrier()

    def _streams(self, config: ModelConfig, train_ids, val_ids):
        cfg = self.cfg
        if cfg.task == "recall":
            task = cfg.recall_task()
            train = RecallStream(task, cfg.seq, config.vocab_size, cfg.batch, cfg.seed, self.rank, self.world)
            return train, RecallStream(task, cfg.seq, config.vocab_size, cfg.batch, cfg.seed + 1)
        if train_ids is None or val_ids is None:
            raise KvlabError("task lm needs train and validation token ids")
        top = int(max(train_ids.max(initial=0), val_ids.max(initial=0)))
        if top >= config.vocab_size:
            raise KvlabError(f"token id {top} does not fit the config's vocab_size {config.vocab_size}")
        train = ChunkSampler(train_ids, cfg.seq, cfg.batch, cfg.seed, self.rank, self.world)
        return train, ChunkSampler(val_ids, cfg.seq, cfg.batch, cfg.seed + 1)

    # ---- one step -------------------------------------------------------------------------------
    def _autocast(self):
        if not self.cfg.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _loss(self, net, batch) -> torch.Tensor:
        if self.objective is not None:  # ``net`` is the objective (possibly DDP-wrapped)
            with self._autocast():
                return net(tuple(t.to(self.device) for t in batch))
        inputs, targets = batch[0].to(self.device), batch[1].to(self.device)
        with self._autocast():
            logits = net(inputs)  # [B, S, V]
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        if len(batch) == 3:  # recall: only the answer positions count
            return losses[batch[2].to(self.device).flatten()].mean()
        return losses.mean()

    def train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the loss of the global batch."""
        cfg, total = self.cfg, 0.0
        for micro in range(cfg.grad_accum):
            last = micro == cfg.grad_accum - 1
            sync = nullcontext() if last or self.world == 1 else self.net.no_sync()
            with sync:
                loss = self._loss(self.net, self.train_data.next_batch()) / cfg.grad_accum
                loss.backward()
            total += float(loss.detach())
        if self.world > 1:  # log the global batch's loss: the mean over processes
            import torch.distributed as dist

            reduced = torch.tensor([total], device=self.device)
            dist.all_reduce(reduced)
            total = float(reduced) / self.world
        if not math.isfinite(total):  # stop before the update: the weights and the last checkpoint stay good
            self.optimizer.zero_grad(set_to_none=True)
            raise self._diverged(self.step + 1, "loss", total)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return total

    def _diverged(self, step: int, what: str, value: float) -> KvlabError:
        kept = (f"the last good checkpoint (step {self.saved_step}) is kept in {self.out / CHECKPOINT}"
                if self.saved_step is not None else "no checkpoint was written")
        return KvlabError(f"step {step}: {what} is {value}; training stopped ({kept}); lower --lr or "
                          "check the config and data")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss on fixed batches (the same every time), plus recall accuracy for that task."""
        self.model.eval()
        try:
            losses = [float(self._loss(self.core, self.val_data.batch_at(i))) for i in range(self.cfg.eval_batches)]
            out = {"val_loss": sum(losses) / len(losses)}
            if not math.isfinite(out["val_loss"]):  # never report a NaN as a result
                raise self._diverged(self.step, "validation loss", out["val_loss"])
            if self.eval_hook is not None and self.rank == 0:
                out.update(self.eval_hook(self.model))
            if self.cfg.task == "recall":
                out["recall_acc"] = recall_accuracy(self.model, self.cfg.recall_task(), self.cfg.seq,
                                                    n_samples=self.cfg.batch * self.cfg.eval_batches,
                                                    seed=self.cfg.seed + 1, batch=self.cfg.batch)
        finally:
            self.model.train()
        return out

    # ---- the loop ------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> dict:
        """Train up to ``cfg.steps`` (or ``stop_after`` more steps, which simulates an interruption).
        Returns the last record: step, loss, val_loss, tok/s."""
        from tqdm import tqdm

        cfg = self.cfg
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        tokens_per_step = cfg.batch * cfg.seq * cfg.grad_accum
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress or self.rank != 0,
                   desc=self.desc, unit="step", dynamic_ncols=True)
        last: dict = {}
        started, done = time.perf_counter(), 0
        try:
            while self.step < end:
                t0 = time.perf_counter()
                loss = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                done += 1
                last = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                        "tok_s": tokens_per_step / dt}
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    last.update(self.evaluate())
                self._log(last)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{last['tok_s']:.0f}",
                                **({"val": f"{last['val_loss']:.3f}"} if "val_loss" in last else {}))
                if self.step % cfg.save_every == 0 or self.step == end:
                    self.save()
        finally:
            bar.close()
        if done:
            last["mean_tok_s"] = tokens_per_step * done / (time.perf_counter() - started)
        return last

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self) -> None:
        """Weights (safetensors) + trainer state into ``RUN_DIR/checkpoint``, swapped in atomically."""
        if self.rank == 0:
            final, tmp, old = self.out / CHECKPOINT, self.out / ".checkpoint.tmp", self.out / ".checkpoint.old"
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.save(tmp, overwrite=True)
            state_io.save_state(tmp, state_io.capture(self))
            if self.tokenizer_file is not None:  # with the chat template / eos beside it, if there is one
                extra = Path(self.tokenizer_file).with_name("tokenizer_config.json")
                for src, name in ((Path(self.tokenizer_file), "tokenizer.json"), (extra, extra.name)):
                    shutil.copyfile(src, tmp / name) if src.is_file() else None
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                for item in final.iterdir():  # a file kvlab did not write moves on to the new checkpoint
                    if item.name not in CHECKPOINT_FILES and not (tmp / item.name).exists():
                        os.replace(item, tmp / item.name)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        self.saved_step = self.step
        self._barrier()

    def _load_state(self) -> None:
        from kvlab.checkpoint import read_safetensors_file
        from kvlab.loading import install_state

        folder = self.out / CHECKPOINT
        if not any((folder / name).exists() for name in (STATE, "trainer.pt")):  # crashed between the renames
            folder = self.out / ".checkpoint.old"
        state = state_io.load_state(folder)  # never unpickles
        # copies in place: parameter layouts (and the optimizer's references) stay as built
        install_state(self.model, read_safetensors_file(folder / "model.safetensors"), str(folder))
        try:
            state_io.restore(self, state)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
            if isinstance(exc, KvlabError):
                raise
            detail = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
            raise KvlabError(f"{folder / STATE}: trainer state is corrupt or from another run ({detail})") from None
        self.saved_step = self.step
        if self.rank == 0 and (self.out / "log.jsonl").exists():  # drop records past the checkpoint
            lines = (self.out / "log.jsonl").read_text().splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= self.step]
            (self.out / "log.jsonl").write_text("".join(line + "\n" for line in kept))
