"""The table of hostile and careless inputs (``hostile_probe.py``: malicious pickles under every file name
kvlab reads, path traversal, FIFOs, YAML alias bombs, huge sizes, NaN/inf, wrong types, corrupted and
truncated checkpoints, existing outputs) across every CLI verb and the Python API. Each case runs in a
forked child with bounded memory and time and must: exit 2 with exactly one stderr line (the API: raise a
one-line ``KvlabError`` that is a ``ValueError``/``TypeError``), print no traceback, not hang, leave every
file outside its output untouched and undeleted, and leave no marker file from a planted pickle."""

from __future__ import annotations

import hostile_probe as probe
import pytest

GROUPS = ["plan", "train", "eval", "generate", "show-mask", "demo", "compare", "api", "usage"]


def group_of(name: str) -> str:
    return next((g for g in GROUPS if name.startswith(g + "-")), "usage")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile") / "w"
    root.mkdir()
    fx = probe.build_fixtures(root)
    return fx, probe.cases(fx)


@pytest.mark.parametrize("group", GROUPS)
def test_hostile_inputs_keep_the_promise(table, group):
    fx, cases = table
    chosen = [case for case in cases if group_of(case[0]) == group]
    assert chosen
    broken = [f"{name}: {why}" for name, what, expect in chosen if (why := probe.run_case(fx, name, what, expect))]
    assert not broken, "\n".join(broken)


def test_every_class_is_in_the_table(table):
    names = " ".join(name for name, _, _ in table[1])
    for word in ("pickle", "traversal", "fifo", "alias-bomb", "huge", "nan", "inf", "str", "truncated",
                 "exists", "force-foreign", "resume-other", "layer-types", "beyond"):
        assert word in names, word
