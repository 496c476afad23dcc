"""The heal driver: loads student and teacher, prepares the data and the run folder, runs the stages
on kvlab's trainer, and writes the quality-versus-tokens curve.

Run folder::

    OUT/heal.json       settings, converted layers and parameters, the unhealed student's fidelity, stages done
    OUT/local/          stage 1's trainer run folder (train_config.json, log.jsonl, checkpoint/)
    OUT/kl/             stage 2's; the last stage's checkpoint/ is the healed model (``kvlab.load`` reads it)
    OUT/curve.json      KL and perplexity against healing tokens, per stage; plus the final numbers
    OUT/curve.png
    OUT/report.json     the healed model's fidelity report against the teacher (``kvlab heal``; report.md too)
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from kvlab.errors import KvlabError
from kvlab.outputs import check_output_dir, manifest_files, prepare_output_dir, record_output, remove_recorded
from kvlab.train.trainer import CHECKPOINT, TrainConfig, Trainer

STAGES = ("local", "kl")
RECORD = "heal.json"
REPORT = ("report.json", "report.md")  # written by the CLI after healing (kvlab.convert.report)


@dataclass
class HealConfig:
    """Settings of one heal run. ``tokens`` is the whole healing budget; with both stages, stage 1 gets
    ``local_share`` of it. Each stage runs ``tokens / (batch * seq * grad_accum)`` optimizer steps."""

    tokens: int
    stage: str = "both"  # local | kl | both
    train: str = "converted"  # stage 2's parameters: converted | attention | all (stage 1: converted)
    batch: int = 4
    seq: int = 256
    grad_accum: int = 1
    local_lr: float = 5e-4  # 2e-3 overshot: on SmolLM2 MQA, 5e-4 reached 31 ppl in 4K tokens, 2e-3 47 in 16K
    kl_lr: float = 3e-4
    local_share: float = 0.5
    warmup: float = 0.1  # fraction of each stage's steps
    clip: float = 1.0
    hidden_weight: float = 0.0
    eval_points: int = 4  # fidelity evaluations per stage (the curve), besides the unhealed start
    eval_windows: int = 4
    eval_seq: int = 256
    corpus: str | None = None
    max_chars: int | None = 4_000_000
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        if self.stage not in (*STAGES, "both"):
            raise KvlabError(f"--stage: must be local, kl or both, got {self.stage!r}")
        if not 0.0 < self.local_share < 1.0 and self.stage == "both":
            raise KvlabError(f"--local-share: must be in (0, 1), got {self.local_share}")
        if self.hidden_weight < 0:
            raise KvlabError(f"--hidden-weight: must be >= 0, got {self.hidden_weight}")
        for name in ("tokens", "eval_points", "eval_windows", "eval_seq"):
            if getattr(self, name) < 1:
                raise KvlabError(f"--{name.replace('_', '-')}: must be a positive integer")
        self.train_config("kl").validate()

    def stages(self) -> list[str]:
        return list(STAGES) if self.stage == "both" else [self.stage]

    def train_config(self, stage: str) -> TrainConfig:
        """The trainer settings of ``stage``: its share of the tokens as steps, evaluations spread evenly,
        no weight decay (healing starts from trained weights), a checkpoint at every evaluation."""
        share = 1.0 if self.stage != "both" else (self.local_share if stage == "local" else 1 - self.local_share)
        steps = max(1, round(self.tokens * share) // (self.batch * self.seq * self.grad_accum))
        every = -(-steps // self.eval_points)  # ceil: at most eval_points evaluations
        return TrainConfig(steps=steps, batch=self.batch, seq=self.seq, grad_accum=self.grad_accum,
                           lr=self.local_lr if stage == "local" else self.kl_lr, warmup=int(self.warmup * steps),
                           clip=self.clip, weight_decay=0.0, eval_every=every, eval_batches=1, save_every=every,
                           seed=self.seed + STAGES.index(stage), device=self.device)


def _prepare(out: Path, force: bool, resume: bool) -> dict:
    """The saved record on ``resume``; else check that ``out`` may be (re)created (done by the caller)."""
    if resume:
        if not (out / RECORD).exists():
            raise KvlabError(f"{out}: no {RECORD}; nothing to resume")
        return json.loads((out / RECORD).read_text())
    check_output_dir(out, force, "heal folder", " or --resume to continue")
    return {}


def _reset(out: Path, force: bool) -> None:
    """``out`` emptied of what an earlier heal wrote (each stage folder is a trainer run folder with its own
    manifest), and nothing else; then created with a manifest of its own."""
    for stage in STAGES:
        if manifest_files(out / stage) is not None:
            remove_recorded(out / stage)
    prepare_output_dir(out, force, files=(RECORD, "curve.json", "curve.png", *REPORT), what="heal folder")


def _write(out: Path, record: dict) -> None:
    from kvlab.checkpoint import atomic_write

    atomic_write(out / RECORD, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))


def _where(path: str | Path) -> str:
    """How heal.json records a model for ``--resume``: an existing folder or file as an absolute path, and
    anything else (a model name such as ``smollm2-135m``) as given."""
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


def heal(student_path: str | Path, teacher_path: str | Path, out: str | Path, cfg: HealConfig, *,
         force: bool = False, resume: bool = False, progress: bool = True, stop_after: int | None = None,
         check=None) -> dict:
    """Heal the kvlab checkpoint ``student_path`` toward ``teacher_path`` into ``out``; returns the
    summary written to ``OUT/curve.json``. Under ``torchrun`` every stage runs data-parallel.
    ``stop_after``: stop after this many optimizer steps in this call (as an interruption would; resume
    later); returns ``{}`` then. ``check(student, teacher)``, when given, runs on the loaded models before
    the run folder is touched or anything trains (e.g. to refuse report flags the models cannot hold)."""
    import kvlab
    from kvlab.data.corpus import ChunkSampler, load_corpus, split_ids
    from kvlab.heal.fidelity import FidelityProbe
    from kvlab.heal.kl import KLObjective
    from kvlab.heal.local import LocalObjective
    from kvlab.heal.select import converted_layers, trainable_names
    from kvlab.tokenizer import load_tokenizer

    out = Path(out)
    rank, world = Trainer._init_distributed()
    saved = _prepare(out, force, resume)
    if saved:
        student_path, teacher_path = saved["student"], saved["teacher"]
        cfg = HealConfig(**saved["config"])
    cfg.validate()
    teacher = kvlab.load(teacher_path).eval()
    student = kvlab.load(student_path)
    if check is not None:
        check(student, teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    layers = converted_layers(student, teacher)
    names = {"local": sorted(trainable_names(student, teacher, "converted")),
             "kl": sorted(trainable_names(student, teacher, cfg.train))}
    tok = load_tokenizer(teacher_path, teacher.config.vocab_size)
    corpus = load_corpus(cfg.corpus, max_chars=cfg.max_chars)
    ids = {split: split_ids(corpus, split, tok) for split in ("train", "val", "test")}  # heal: train; eval: test
    calibration = ChunkSampler(ids["val"], cfg.seq, cfg.batch, cfg.seed).batch_at(0)[0]
    probe = FidelityProbe(teacher, ids["test"], cfg.eval_seq, cfg.eval_windows) if rank == 0 else None
    if rank == 0 and not resume:
        _reset(out, force)
        saved = {"student": _where(student_path), "teacher": _where(teacher_path),
                 "config": dataclasses.asdict(cfg), "converted_layers": layers, "trainable": names,
                 "start": probe(student), "done": [], "seconds": {}}
        _write(out, saved)
    if world > 1:  # rank 0 has written the record
        import torch.distributed as dist

        dist.barrier()
    saved = json.loads((out / RECORD).read_text())
    tokenizer_file = getattr(tok, "path", None)
    if tokenizer_file is None and hasattr(tok, "save"):  # a GGUF teacher's tokenizer: saved once, then copied
        if rank == 0:
            tok.save(out)
            record_output(out, "tokenizer.json", "tokenizer_config.json")
        tokenizer_file = out / "tokenizer.json"
    eval_seconds = [0.0]

    def hook(model) -> dict:
        t0 = time.perf_counter()
        result = probe(model)
        eval_seconds[0] += time.perf_counter() - t0
        return result

    for stage in cfg.stages():
        folder = out / stage
        if stage in saved["done"]:
            student = kvlab.load(folder / CHECKPOINT)
            continue
        objective = (lambda m: LocalObjective(m, teacher, layers, calibration)) if stage == "local" else \
            (lambda m: KLObjective(m, teacher, cfg.hidden_weight, calibration))
        chosen = set(names[stage])
        trainer = Trainer(student.config, cfg.train_config(stage), folder, ids["train"], ids["val"], force=True,
                          resume=resume and (folder / CHECKPOINT).exists(), tokenizer_file=tokenizer_file,
                          meta={"heal_stage": stage, "teacher": saved["teacher"], "student": saved["student"]},
                          progress=progress, model=student, trainable=chosen.__contains__, objective=objective,
                          eval_hook=hook if rank == 0 else None, desc=f"heal {stage}")
        eval_seconds[0], t0 = 0.0, time.perf_counter()
        before = trainer.step
        trainer.run(stop_after=stop_after)
        if stop_after is not None:
            stop_after -= trainer.step - before
        if trainer.step < trainer.cfg.steps:  # interrupted on purpose
            return {}
        if rank == 0:
            wall = time.perf_counter() - t0
            saved["done"].append(stage)
            saved["seconds"][stage] = {"wall": wall, "eval": eval_seconds[0], "train": wall - eval_seconds[0]}
            _write(out, saved)
        student = trainer.model
    return finish(out, saved, cfg) if rank == 0 else {}


def finish(out: Path, saved: dict, cfg: HealConfig) -> dict:
    """Write ``curve.json`` and ``curve.png`` from the stages' logs; return the summary."""
    from kvlab.checkpoint import atomic_write
    from kvlab.heal.curve import curve_points, plot_curve

    stages = cfg.stages()
    per_step = {s: cfg.batch * cfg.seq * cfg.grad_accum for s in stages}
    points = curve_points(out, stages, saved["start"], per_step)
    final = points[-1]
    summary = {"teacher_ppl": saved["start"]["teacher_ppl"], "start": saved["start"], "final": final,
               "seconds": saved["seconds"], "checkpoint": str(out / stages[-1] / CHECKPOINT),
               "eval_tokens": saved["start"]["eval_tokens"], "points": points}
    atomic_write(out / "curve.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
    title = f"heal {Path(saved['student']).name} <- {Path(saved['teacher']).name}"
    plot_curve(points, saved["start"]["teacher_ppl"], out / "curve.png", title)
    return summary
