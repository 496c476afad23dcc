"""``kvlab export``: write a kvlab model in a format stock engines serve unmodified (Hugging Face
safetensors + config.json of a stock family, or a llama-arch GGUF), then reload it in the target engine
and compare with kvlab (``export_check.json``). ``layout.py`` picks the family or refuses; ``hf.py`` and
``gguf.py`` write; ``check.py`` runs the round trip; ``engines/`` holds the engine drivers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FORMATS = ("hf", "gguf")
CHECK_FILE = "export_check.json"
VLLM_MLA = ("not run: vLLM 0.32's CPU MLA decode kernel supports only DeepSeek's latent, kv_lora_rank 512 + "
            "qk_rope_head_dim 64 (576 wide; its AMX backend also needs bf16); serve this export with transformers")


def source_folder(ckpt) -> Path | None:
    """The folder a checkpoint came from (for its tokenizer), when ``ckpt`` is a path."""
    return Path(ckpt) if isinstance(ckpt, (str, Path)) and Path(ckpt).is_dir() else None


def export(ckpt, fmt: str, out: str | Path, force: bool = False, gguf_type: str = "f32", check: bool = True,
           n_new: int = 16, vllm: bool = False, log=print, tokenizer_from: str | Path | None = None) -> dict:
    """Export ``ckpt`` (a checkpoint folder or a kvlab ``Model``) to ``out``; returns the check report,
    also saved as ``out/export_check.json``. The tokenizer comes from the checkpoint folder (or
    ``tokenizer_from``). The folder is prepared only after the model is known to be exportable, so a
    refusal leaves nothing behind."""
    from kvlab.errors import KvlabError
    from kvlab.export.layout import classify
    from kvlab.export.outdir import OutputFolder

    if fmt not in FORMATS:
        raise KvlabError(f"--format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    model = _load(ckpt)
    layout = classify(model.config)
    source = Path(tokenizer_from) if tokenizer_from is not None else source_folder(ckpt)
    if fmt == "gguf":
        from kvlab.export.gguf import GGUF_TYPES

        if gguf_type not in GGUF_TYPES:
            raise KvlabError(f"--gguf-type: must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
        ensure, write_gguf = gguf_writer(layout)
        ensure(model.config, layout)
    folder = OutputFolder(out, force)
    report: dict = {"format": fmt, "family": layout.family, "source": str(source or "in-memory model")}
    if fmt == "hf":
        from kvlab.export.hf import write_hf

        report["files"] = write_hf(model, layout, folder, source)
    else:
        report.update(write_gguf(model, layout, folder, source, gguf_type), gguf_type=gguf_type)
        report["files"] = list(folder.files)
    log(f"exported {report['source']} as {layout.family} ({fmt}) to {folder.path}")
    if check:
        model = model.float()  # compared in fp32 on both sides (upcasting the weights is exact)
        report["checks"] = run_checks(model, fmt, folder.path, report, source, n_new, vllm)
        for record in report["checks"]:
            from kvlab.export.check import print_record

            print_record(record)
    folder.file(CHECK_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def run_checks(model, fmt: str, path: Path, report: dict, source: Path | None, n_new: int, vllm: bool) -> list:
    from kvlab.export import check

    ref = check.kvlab_reference(model, check.check_prompt(model, source), n_new)
    if fmt == "gguf":
        has_tokenizer = source is not None and (source / "tokenizer.json").is_file()
        return check.check_llamacpp([path / report["file"]], [ref], tokenizer=source if has_tokenizer else None)
    records = [check.check_transformers(model, path, ref)]
    spec = model.config.layer(0)
    if vllm and report["family"] == "deepseek_v3" and (spec.kv_lora_rank, spec.qk_rope_head_dim) != (512, 64):
        records.append({"engine": "vLLM", "skipped": VLLM_MLA})
    elif vllm:
        records += check.check_vllm([path], [[ref]])[0]
    return records


def gguf_writer(layout):
    """(refusal check, writer) of the GGUF architecture for ``layout``: deepseek2 for MLA, else llama."""
    if layout.family == "deepseek_v3":
        from kvlab.export.gguf_mla import ensure_deepseek2, write_deepseek2

        return ensure_deepseek2, write_deepseek2
    from kvlab.export.gguf import ensure_llama, write_llama

    return ensure_llama, write_llama


def _load(ckpt):
    import kvlab

    model = ckpt if isinstance(ckpt, torch.nn.Module) else kvlab.load(ckpt)
    return model.eval()
