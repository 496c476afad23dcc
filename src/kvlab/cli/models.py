"""``kvlab models``: the named models (usable wherever a checkpoint path is) and whether each is installed."""

from __future__ import annotations

import json


def add_parser(sub):
    p = sub.add_parser("models", help="list named models and whether each is installed",
                       description="Named models stand for real checkpoints shipped in pip packages; pass the "
                       "name wherever a checkpoint path is accepted (generate, eval, plan, kvlab.load).")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def run(args) -> int:
    from kvlab.named_models import NAMED_MODELS

    rows = []
    for model in NAMED_MODELS.values():
        path = model.path()
        rows.append({"name": model.name, "installed": path is not None, "path": str(path) if path else None,
                     "install": model.install_hint, "description": model.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        where = row["path"] if row["installed"] else f"not installed: {row['install']}"
        print(f"{row['name']:<16} {row['description']}\n{'':<16} {where}")
    return 0
