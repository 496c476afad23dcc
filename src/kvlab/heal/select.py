"""Which layers and parameters a conversion changed: what healing trains.

A layer is *converted* when its attention spec differs from the teacher's, or when any of its attention
parameters is new, reshaped or holds different values. Its *converted parameters* are the attention
parameters that are new, reshaped or changed; a converted layer whose parameters are all unchanged (a
sliding window or a quantized cache on the source's weights) trains all its attention parameters."""

from __future__ import annotations

import torch

from kvlab.errors import KvlabError

MODES = ("converted", "attention", "all")


def _attention_prefix(i: int) -> str:
    return f"layers.{i}.self_attn."


def check_pair(student, teacher) -> None:
    """Refuse (one line) a student and teacher that differ outside attention (names or shapes)."""
    s, t = student.config, teacher.config
    for name in ("vocab_size", "d_model", "n_layers"):
        if getattr(s, name) != getattr(t, name):
            raise KvlabError(f"student and teacher differ in {name} ({getattr(s, name)} vs {getattr(t, name)}); "
                             "heal needs a student converted from this teacher")
    mine, theirs = dict(student.named_parameters()), dict(teacher.named_parameters())
    for name, p in mine.items():
        if ".self_attn." in name:
            continue
        if name not in theirs or theirs[name].shape != p.shape:
            raise KvlabError(f"student and teacher differ outside attention ({name}); heal needs a student "
                             "converted from this teacher")


def _changed(name: str, p: torch.Tensor, theirs: dict[str, torch.Tensor]) -> bool:
    return name not in theirs or theirs[name].shape != p.shape or not torch.equal(theirs[name], p.detach())


def converted_layers(student, teacher) -> list[int]:
    """Indices of the layers whose attention the conversion changed (spec or parameters)."""
    check_pair(student, teacher)
    theirs = dict(teacher.named_parameters())
    out = []
    for i in range(student.config.n_layers):
        prefix = _attention_prefix(i)
        names = {n for n in theirs if n.startswith(prefix)}
        mine = {n: p for n, p in student.named_parameters() if n.startswith(prefix)}
        if (student.config.layers[i].to_dict() != teacher.config.layers[i].to_dict() or set(mine) != names
                or any(_changed(n, p, theirs) for n, p in mine.items())):
            out.append(i)
    return out


def converted_parameters(student, teacher) -> set[str]:
    """Names of the student parameters the conversion created or changed (see the module docstring)."""
    theirs = dict(teacher.named_parameters())
    out: set[str] = set()
    for i in converted_layers(student, teacher):
        mine = {n: p for n, p in student.named_parameters() if n.startswith(_attention_prefix(i))}
        changed = {n for n, p in mine.items() if _changed(n, p, theirs)}
        out |= changed or set(mine)
    return out


def trainable_names(student, teacher, mode: str = "converted") -> set[str]:
    """Parameter names that train under ``--train mode``: converted, attention (every attention
    parameter) or all."""
    if mode not in MODES:
        raise KvlabError(f"--train: must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "all":
        check_pair(student, teacher)
        return {n for n, _ in student.named_parameters()}
    if mode == "attention":
        check_pair(student, teacher)
        return {n for n, _ in student.named_parameters() if ".self_attn." in n}
    names = converted_parameters(student, teacher)
    if not names:
        raise KvlabError("the student's attention equals the teacher's: nothing was converted, nothing to heal")
    return names
