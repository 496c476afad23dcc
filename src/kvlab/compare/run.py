"""``compare()``: train every variant (same batches and seeds, matched parameters) on both tasks, measure
its cache and speed, and write compare.md, compare.json and the plots. Jobs are cached on disk, so an
interrupted comparison resumes; training jobs run in ``budget.workers`` processes side by side, while
timings are taken afterwards in this process alone, all variants interleaved (their ratios stay fair)."""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from kvlab.checkpoint import atomic_write
from kvlab.compare.jobs import (
    TASKS,
    Budget,
    lm_data,
    memory_job,
    read_cached,
    speed_job,
    train_job,
    write_cached,
)
from kvlab.compare.report import markdown, plots, summarize
from kvlab.compare.variants import DEFAULT_VARIANTS, availability, base_model, count_params, match_params
from kvlab.errors import KvlabError
from kvlab.machine import machine_info
from kvlab.safe_io import dumps_finite


def folder_name(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def default_variants(budget: Budget) -> tuple[dict[str, dict], dict[str, tuple[str, ...]]]:
    """The default variant configs and the techniques each needs."""
    variants, needs = {}, {}
    for name, (need, layers, extra) in DEFAULT_VARIANTS.items():
        variants[name] = base_model(layers, max_seq_len=budget.longest(), **extra)
        needs[name] = need
    return variants, needs


def _fit(name: str, config: dict, budget: Budget, log) -> dict:
    """A user's config made trainable by the comparison: byte vocabulary (both tasks are byte-level) and a
    ``max_seq_len`` covering every measured length. Says so when it changes either."""
    fitted = {**config, "vocab_size": 256, "max_seq_len": max(budget.longest(), config.get("max_seq_len", 0))}
    changed = [f"{key} {config.get(key)} -> {fitted[key]}" for key in ("vocab_size", "max_seq_len")
               if config.get(key) != fitted[key]]
    if changed:
        log(f"{name}: {', '.join(changed)} (the comparison trains byte-level models)")
    return fitted


def compare(out: Path, budget: Budget, variants: dict[str, dict] | None = None, log=print) -> dict:
    """Run (or resume) a comparison into ``out``; returns the summary also written to compare.json."""
    from kvlab.outputs import adopt_output_dir, record_output

    started = time.perf_counter()
    adopt_output_dir(out, "compare folder", legacy=("variants",))  # ours (manifest), empty or absent
    if variants is None:
        variants, needs = default_variants(budget)
    else:
        variants = {name: _fit(name, config, budget, log) for name, config in variants.items()}
        needs = {name: () for name in variants}
    runnable, results = _match(variants, needs, log)
    if not runnable:
        raise KvlabError("compare: no variant can be run (" + "; ".join(f"{n}: {r['why']}" for n, r in results.items())
                         + ")")
    jobs = [(name, task, seed) for name in runnable for task in TASKS for seed in range(budget.seeds)]
    trained = _train_all(runnable, jobs, budget, out, log)
    timing = _speed(runnable, budget, out, log)
    for name, config in runnable.items():
        key = {"config": config, "contexts": budget.contexts, "long_context": budget.long_context}
        path = out / "variants" / folder_name(name) / "memory.json"
        memory = read_cached(path, key)
        if memory is None:
            memory = memory_job(config, budget.contexts, budget.long_context, budget.device)
            write_cached(path, key, memory)
        runs = trained[name]
        results[name] = {"available": True, "params": runs["recall"][0]["params"],
                         "mlp_hidden": config["mlp_hidden"], **memory, **timing["variants"][name],
                         "recall_runs": runs["recall"], "lm_runs": runs["lm"]}
    summary = summarize(results, budget)
    summary["machine"] = machine_info()
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["job_seconds"] = round(timing["seconds"] + sum(run.get("seconds", 0.0) for r in results.values()
                                                           if r.get("available")
                                                           for run in [*r["recall_runs"], *r["lm_runs"]]), 1)
    text = dumps_finite(summary, indent=2) + "\n"  # a NaN is refused, never written
    atomic_write(out / "compare.json", lambda tmp: Path(tmp).write_text(text))
    table = markdown(summary)
    atomic_write(out / "compare.md", lambda tmp: Path(tmp).write_text(table))
    plots(summary, out)
    written = [p.relative_to(out).as_posix() for p in [out / "compare.json", out / "compare.md", out / "speed.json",
               *out.glob("*.png"), *(out / "variants").rglob("*")] if p.is_file() and not p.is_symlink()]
    record_output(out, *written)  # kvlab's own files in its own folder: what a later --force may remove
    return summary


def _speed(runnable: dict[str, dict], budget: Budget, out: Path, log) -> dict:
    """Speed of every runnable variant, measured together (interleaved) and cached as one job."""
    key = {"configs": runnable, "contexts": budget.contexts, "speed_width": budget.speed_width,
           "device": budget.device}
    path = out / "speed.json"
    if not runnable:
        return {"variants": {}, "seconds": 0.0}
    timing = read_cached(path, key)
    if timing is None:
        log(f"measuring prefill and decode speed of {len(runnable)} variants at {budget.speed_width}x width, "
            f"interleaved")
        timing = speed_job(runnable, budget.contexts, budget.speed_width, budget.device)
        write_cached(path, key, timing)
    return timing


def _match(variants: dict[str, dict], needs: dict[str, tuple[str, ...]], log) -> tuple[dict, dict]:
    """Runnable variants with their MLP width matched to the first one's parameter count; results of the
    others say why they are not available."""
    runnable, results, target = {}, {}, None
    for name, config in variants.items():
        why = availability(needs[name], config)
        if why is not None:
            results[name] = {"available": False, "why": why}
            log(f"{name}: not available ({why})")
            continue
        if target is None:  # the first runnable variant (MHA by default) sets the parameter target
            target = count_params(config)
        runnable[name], _ = match_params(config, target)
    return runnable, results


def _train_all(runnable: dict[str, dict], jobs: list[tuple[str, str, int]], budget: Budget, out: Path,
               log) -> dict[str, dict[str, list[dict]]]:
    """Every (variant, task, seed) training job, from the cache or trained now; grouped per variant."""
    done: dict[tuple[str, str, int], dict] = {}
    todo = []
    for name, task, seed in jobs:
        key = {"config": runnable[name], "budget": budget.job_key(task), "seed": seed}
        path = out / "variants" / folder_name(name) / f"{task}_seed{seed}.json"
        cached = read_cached(path, key)
        if cached is not None:
            done[name, task, seed] = cached
        else:
            todo.append((name, task, seed, key, path))
    if len(done):
        log(f"{len(done)} of {len(jobs)} training jobs cached")
    if todo:
        data = lm_data(budget) if any(task == "lm" for _, task, *_ in todo) else None
        log(f"training {len(todo)} jobs in {budget.workers} process(es)")

        def job_args(name: str, task: str, seed: int, threads: int | None) -> tuple:
            folder = str(out / "variants" / folder_name(name) / f"{task}_seed{seed}")
            return runnable[name], budget, task, seed, folder, data if task == "lm" else None, threads

        if budget.workers > 1:
            import multiprocessing

            with ProcessPoolExecutor(budget.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(train_job, *job_args(*item[:3], 1)): item for item in todo}
                for future in as_completed(futures):
                    _finish(done, *futures[future], future.result(), log)
        else:
            for item in todo:
                _finish(done, *item, train_job(*job_args(*item[:3], None)), log)
    grouped: dict[str, dict[str, list[dict]]] = {name: {task: [] for task in TASKS} for name in runnable}
    for (name, task, _seed), result in sorted(done.items()):
        grouped[name][task].append(result)
    return grouped


def _finish(done: dict, name: str, task: str, seed: int, key: dict, path: Path, result: dict, log) -> None:
    write_cached(path, key, result)
    done[name, task, seed] = result
    score = (f"recall@{max(map(int, result['recall']))} {result['recall'][str(max(map(int, result['recall'])))]:.3f}"
             if task == "recall" else f"{result['bits_per_byte']:.3f} bits/byte")
    log(f"{name}: {task} seed {seed} done ({score})")
