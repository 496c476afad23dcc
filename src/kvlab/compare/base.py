"""``kvlab compare --base MODEL``: convert a real checkpoint into every row (``kvlab.convert``'s library),
measure each row training-free and after the same healing budget (``kvlab.heal``), and write
compare.md, compare.json and plots.

Jobs (every one cached as JSON in ``OUT/jobs/`` keyed by its inputs, so an interrupted run resumes):
``free-ROW`` and ``healed-ROW`` (perplexity / KL / top-1 through the cache over disjoint held-out
samples), ``heal-ROW`` (kvlab heal), ``needle-free`` / ``needle-healed`` (passkeys, every model of the
stage interleaved so decode tok/s ratios to the source are fair) and ``complexity`` (prefill and decode
time against context on a slice of every row's layers, interleaved). The source is calibrated once, and
the statistics are shared by every row that needs them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from kvlab.compare.base_rows import ROWS, BaseBudget, Row, row_key, row_steps, slug
from kvlab.compare.jobs import read_cached, write_cached
from kvlab.errors import KvlabError

WORK = "work"  # converted and healed checkpoints (removed when the run is complete)
IDENTITY = "equals the source's full forward at the heal length: nothing to heal"


class Session:
    """The source model, its tokenizer, data and (lazily) calibration statistics, loaded once."""

    def __init__(self, base: str, budget: BaseBudget, log):
        import kvlab
        from kvlab.data.corpus import load_corpus, split_ids
        from kvlab.tokenizer import load_tokenizer

        self.base, self.budget, self.log = base, budget, log
        t0 = time.perf_counter()
        self.source = kvlab.load(base).eval()
        self.config = self.source.config
        self.tokenizer = load_tokenizer(base, self.config.vocab_size)
        self.corpus = load_corpus(None, max_chars=budget.max_chars)
        self.test_ids = split_ids(self.corpus, "test", self.tokenizer)
        self._stats, self._reference = None, {}
        log(f"{base}: loaded with its tokenizer and the test split in {time.perf_counter() - t0:.0f} s")

    def stats(self) -> list:
        if self._stats is None:
            from kvlab.convert.calibrate import calibration_rows, collect
            from kvlab.data.corpus import split_ids

            t0 = time.perf_counter()
            ids = split_ids(self.corpus, "train", self.tokenizer)
            self._stats = collect(self.source, calibration_rows(ids, 1, self.budget.calib_len), progress=False)
            self.log(f"calibrated once on 1 x {self.budget.calib_len} train tokens ({time.perf_counter() - t0:.0f} s)")
        return self._stats

    def convert(self, row: Row):
        from kvlab.convert.build import convert, needs_calibration

        steps = row_steps(row, self.config.n_layers)
        return convert(self.source, steps, self.stats() if needs_calibration(steps) else [], seed=0)

    def eval_rows(self, sample: int) -> torch.Tensor:
        from kvlab.eval.fidelity import heldout_rows

        b = self.budget
        return heldout_rows(self.test_ids, 1, b.eval_len, offset=sample * (b.eval_len + 1))

    def reference(self, sample: int) -> list[dict]:
        """The source's log-probabilities on held-out sample ``sample``: computed once, shared by every row."""
        if sample not in self._reference:
            from kvlab.eval.fidelity import reference_log_probs

            self._reference[sample] = reference_log_probs(self.source, self.eval_rows(sample), self.budget.chunk)
        return self._reference[sample]

    def heal_is_identity(self, model) -> bool:
        """True when ``model``'s full forward equals the source's at the heal length (within 1e-4): healing
        trains on that form (layer-local outputs, or KL of the logits), so there is nothing to learn, and
        Adam would only follow float noise. A sliding window wider than the heal sequence, a quantized
        cache, a sparse pattern whose local band covers it."""
        ids = self.eval_rows(0)[:, : self.budget.heal_seq]
        with torch.no_grad():
            return torch.allclose(model(ids), self.source(ids), atol=1e-4, rtol=1e-4)

    def haystack(self):
        return self.test_ids[self.budget.eval_samples * (self.budget.eval_len + 1):]


def check_bytes(where: str, config, context: int, measured: int) -> None:
    """Rule 1: a live cache holds exactly what ``kvlab plan`` predicts."""
    from kvlab.planner import plan

    planned = plan(config, context=context).total_bytes
    if measured != planned:
        raise KvlabError(f"internal: {where}: live cache {measured} bytes at {context} tokens, kvlab plan {planned}")


def fidelity_job(s: Session, model, where: str) -> dict:
    """KL / top-1 / perplexities through the cache over each disjoint sample (one value per sample)."""
    from kvlab.eval.fidelity import compare

    per = []
    for sample in range(s.budget.eval_samples):
        f = compare(s.source, model, s.eval_rows(sample), s.budget.chunk, progress=False, reference=s.reference(sample))
        check_bytes(where, model.config, f["cache_bytes"]["context"], f["cache_bytes"]["converted"])
        per.append(f)
    return {"samples": per, "context": per[0]["cache_bytes"]["context"],
            "cache_bytes": per[0]["cache_bytes"]["converted"]}


def serve(budget: BaseBudget, where: str):
    """The ``after`` hook of the passkeys at ``budget.serve_context``: as many sequences as the KV budget holds
    (capped at ``serve_max_batch``) decode together from the answer's cache; live bytes == plan at that batch."""
    from kvlab.eval.serving import batched_decode, sequences_fit
    from kvlab.planner import plan

    def after(name, model, n, cache, token):
        if n != budget.serve_context:
            return None
        fit = sequences_fit(model.config, n, int(budget.serve_gib * 2**30))
        batch = max(1, min(fit, budget.serve_max_batch))
        held = cache.step
        r = batched_decode(model, cache, token, batch, budget.serve_steps)
        planned = plan(model.config, context=held, batch=batch).total_bytes
        if r["cache_bytes"] != planned:
            raise KvlabError(f"internal: {name} {where}: live cache {r['cache_bytes']} bytes for {batch} x {held} "
                             f"tokens, kvlab plan {planned}")
        return {**r, "fit": fit, "capped": fit > batch}
    return after


def needle_job(s: Session, models: dict, serving: bool = False) -> dict:
    """Passkey accuracy and decode tok/s of ``models``, interleaved trial by trial. Contexts above
    ``budget.needle_gate`` run only for the models that found a key at the gate (a model that misses every
    key at 2K is not tried at 8K: the longest prefills are the run's most expensive steps)."""
    from kvlab.eval.needle import run_needles

    b = s.budget
    gate = b.needle_gate
    short = [n for n in b.needle_contexts if gate is None or n <= gate]
    long = [n for n in b.needle_contexts if n not in short]
    after = serve(b, "serving") if serving else None
    res = run_needles(models, s.tokenizer, s.haystack(), short, b.needle_depths, seed=0, progress=False, after=after)
    passing = {name: m for name, m in models.items() if long and res[name]["accuracy"][gate] > 0}
    if passing:
        more = run_needles(passing, s.tokenizer, s.haystack(), long, b.needle_depths, seed=0, progress=False)
        for name, r in more.items():
            for field, values in r.items():
                res[name][field].update(values)
    for name, r in res.items():
        for n, got in r["cache_bytes"].items():
            check_bytes(f"{name} needle", models[name].config, n, got)
    return {name: {field: {str(n): v for n, v in r[field].items()}
                   for field in ("accuracy", "decode_tok_s", "cache_bytes", "answers", "after")} for name, r in res.items()}


def slice_config(config, every: int, longest: int):
    """Every ``every``-th layer of ``config`` (from layer 0), long enough for ``longest`` tokens."""
    from kvlab.config import ModelConfig

    layers = [spec.to_dict() for spec in config.layers][::every]
    return ModelConfig.from_dict({**config.to_dict(), "layers": layers, "n_layers": len(layers),
                                  "max_seq_len": max(config.max_seq_len, longest + 64)})


def complexity_job(configs: dict, budget: BaseBudget) -> dict:
    """Prefill seconds and decode tok/s against context on each row's layer slice (random weights: time
    does not depend on them), all rows interleaved; exponents fitted on log time vs log length."""
    from kvlab.eval.evaluate import kv_bytes, scaling_exponent, speeds
    from kvlab.model import Model

    lengths = budget.speed_lengths
    torch.manual_seed(0)
    models = {name: Model(slice_config(c, budget.speed_layers, max(lengths))).eval() for name, c in configs.items()}
    for name, m in models.items():  # live cache == plan on every slice, at the longest length
        check_bytes(f"{name} slice", m.config, max(lengths), kv_bytes(m, [max(lengths)])[max(lengths)])
    timing = speeds(models, lengths, decode_steps=4, repeats=1)
    return {name: {"speed": {str(n): v for n, v in t.items()},
                   "prefill_exponent": scaling_exponent(lengths, [t[n]["prefill_s"] for n in lengths]),
                   "decode_exponent": scaling_exponent(lengths, [1 / t[n]["decode_tok_s"] for n in lengths])}
            for name, t in timing.items()}


class Jobs:
    """Cached jobs in ``OUT/jobs``: ``run(name, key, fn)`` returns the cached result or computes it."""

    def __init__(self, out: Path, log):
        self.folder, self.log, self.cached, self.ran = out / "jobs", log, 0, 0

    def run(self, name: str, key: dict, fn) -> dict:
        path = self.folder / f"{slug(name)}.json"
        hit = read_cached(path, key)
        if hit is not None:
            self.cached += 1
            return hit
        t0 = time.perf_counter()
        result = fn()
        result["seconds"] = time.perf_counter() - t0
        write_cached(path, key, result)
        self.ran += 1
        self.log(f"{name}: {result['seconds']:.0f} s")
        return result


def _heal_config(budget: BaseBudget, seed: int):
    from kvlab.heal.driver import HealConfig

    return HealConfig(tokens=budget.heal_tokens, stage=budget.heal_stage, batch=1, seq=budget.heal_seq, eval_points=1, eval_windows=1,
                      eval_seq=64, max_chars=budget.max_chars, seed=seed)


def compare_base(base: str, out: Path, budget: BaseBudget, log=print) -> dict:
    """Run (or resume) the comparison of ``base``'s conversions into ``out``; returns compare.json's data."""
    import dataclasses

    import kvlab
    from kvlab.compare.base_report import summarize, write_outputs
    from kvlab.heal.driver import heal
    from kvlab.outputs import adopt_output_dir

    started = time.perf_counter()
    adopt_output_dir(out, "compare folder", legacy=("jobs",))  # ours (manifest or job cache), empty or absent
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    rows = [r for r in ROWS if budget.rows is None or r.name in budget.rows]
    sessions: list = []

    def session() -> Session:  # loaded only when a job is not cached
        if not sessions:
            sessions.append(Session(base, budget, log))
        return sessions[0]

    jobs = Jobs(out, log)
    common = {"base": base, "calib_len": budget.calib_len, "max_chars": budget.max_chars}
    ev = {**common, **budget.key("eval_samples", "eval_len", "chunk")}
    hk = {**common, **budget.key("heal_tokens", "heal_seq", "heal_stage", "max_chars")}  # + the seed
    results: dict = {"rows": {}}
    models_dir = out / WORK
    for row in rows:
        key = {**ev, **row_key(row)}
        folder = models_dir / slug(row.name)
        converted = []

        def model(row=row, folder=folder, converted=converted):
            if not converted:
                t0 = time.perf_counter()
                converted.append(session().convert(row))
                log(f"{row.name}: converted in {time.perf_counter() - t0:.0f} s")
            return converted[0]

        r = {"free": jobs.run(f"free-{row.name}", {**key, "stage": "free"},
                              lambda row=row: {**fidelity_job(session(), model(), row.name), "config": model().config.to_dict(),
                                       "source_config": session().config.to_dict()})}
        student = folder / "converted"

        def do_heal(seed: int, row=row, student=student, folder=folder):
            config = _heal_config(budget, seed)
            if session().heal_is_identity(model()):
                return {"skipped": IDENTITY, "heal_seconds": 0.0, "curve": [], "config": dataclasses.asdict(config)}
            if not (student / "config.json").exists():
                model().save(student, overwrite=True)
            shutil.rmtree(folder / f"heal-{seed}", ignore_errors=True)
            summary = heal(student, base, folder / f"heal-{seed}", config, force=True, progress=False)
            return {"checkpoint": summary["checkpoint"], "heal_seconds": summary["seconds"],
                    "curve": summary["points"], "config": dataclasses.asdict(config)}

        heals, healed_evals = [], []
        for seed in range(budget.heal_seeds):  # seed 0 is the healed model of the passkeys; others add spread
            heal_key = {**hk, **row_key(row), "seed": seed}
            suffix = f" seed {seed}" if seed else ""
            heals.append(jobs.run(f"heal-{row.name}{suffix}", heal_key, lambda seed=seed: do_heal(seed)))
            if "skipped" in heals[0]:  # healing cannot change it: the healed model is the training-free one
                healed_evals.append({**r["free"], "seconds": 0.0, "same_as": "free"})
                break
            healed_evals.append(jobs.run(f"healed-{row.name}{suffix}", {**key, **heal_key, "stage": "healed"},
                                         lambda h=heals[-1], row=row: fidelity_job(session(), kvlab.load(h["checkpoint"]).eval(),
                                                                                   row.name + " healed")))
        r["heal"] = {**heals[0], "seeds": len(heals), "seconds": sum(h["seconds"] for h in heals),
                     "heal_seconds_per_seed": [h["heal_seconds"] for h in heals]}
        r["healed"] = {**healed_evals[0], "samples": [f for h in healed_evals for f in h["samples"]],
                       "seconds": sum(h["seconds"] for h in healed_evals)}
        results["rows"][row.name] = r
        converted.clear()
    nk = {**common, **budget.key("eval_samples", "eval_len", "needle_contexts", "needle_depths", "needle_gate", "serve_context",
                                 "serve_gib", "serve_max_batch", "serve_steps"),
          "rows": [r.name for r in rows]}
    row_cfg = {r.name: kvlab.config.ModelConfig.from_dict(results["rows"][r.name]["free"]["config"]) for r in rows}

    healed_rows = [r for r in rows if "skipped" not in results["rows"][r.name]["heal"]]

    def needles(stage: str) -> dict:  # the healed stage: only the rows healing changed (no source: speed is free's)
        s = session()
        models = {"source": s.source} if stage == "free" else {}
        for row in rows if stage == "free" else healed_rows:
            saved = models_dir / slug(row.name) / "converted"
            if stage == "free":
                models[row.name] = kvlab.load(saved).eval() if (saved / "config.json").exists() else s.convert(row)
            else:
                models[row.name] = kvlab.load(results["rows"][row.name]["heal"]["checkpoint"]).eval()
        return needle_job(s, models, serving=stage == "free") if models else {}

    results["source"] = {"config": results["rows"][rows[0].name]["free"]["source_config"]}
    src_cfg = kvlab.config.ModelConfig.from_dict(results["source"]["config"])

    results["needle_free"] = jobs.run("needle-free", {**nk, "stage": "free"}, lambda: needles("free"))
    results["needle_healed"] = jobs.run("needle-healed", {**nk, **hk, "stage": "healed", "rows": [r.name for r in healed_rows]},
                                        lambda: needles("healed"))
    for row in rows:  # rows healing cannot change: their healed passkeys are the training-free ones
        results["needle_healed"].setdefault(row.name, results["needle_free"][row.name])
    ck = {"base": base, **budget.key("speed_lengths", "speed_layers"), "rows": [r.name for r in rows]}
    results["complexity"] = jobs.run("complexity", ck, lambda: complexity_job({"source": src_cfg, **row_cfg}, budget))
    if models_dir.exists():  # every job is cached: the checkpoints are no longer needed
        shutil.rmtree(models_dir)
    log(f"{jobs.cached} jobs cached, {jobs.ran} run")
    summary = summarize(base, rows, results, budget, time.perf_counter() - started)
    write_outputs(summary, out)
    return summary
