"""Hypothesis fuzzing of config parsing and of every CLI verb's arguments: whatever a user types, kvlab
either works or says one line (exit 2, no traceback); a config either validates into well-typed fields
or raises ``ConfigError``. Bounded example counts keep the whole file well under a minute."""

from __future__ import annotations

import copy
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvlab
from kvlab.cli import build_parser, main
from kvlab.errors import KvlabError

BASE = {"vocab_size": 256, "d_model": 32, "n_layers": 2, "mlp_hidden": 64, "max_seq_len": 128,
        "layers": [{"type": "full", "n_heads": 4, "n_kv_heads": 2}, {"type": "full", "n_heads": 4}]}
FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))

HOSTILE_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(-2**70, 2**70),
    st.sampled_from([0, 1, 2, 7, 10**9, 2**31, 2**63, 0.0, -0.0, 0.5, 1e-300, 1e300, float("nan"), float("inf"),
                     -float("inf"), "", "x", "false", "true", "1", "nan", "full", [], {}, [1], {"a": 1}]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4))
FIELDS = ["vocab_size", "d_model", "n_layers", "mlp_hidden", "max_seq_len", "norm_eps", "tie_embeddings", "dtype",
          "rope", "mlp_act", "name", "extras", "embed_scale", "logit_softcap", "sandwich_norms", "layers",
          "hyper_connections", "per_layer_embeddings", "kv_sharing"]
LAYER_FIELDS = ["type", "n_heads", "n_kv_heads", "head_dim", "qk_norm", "qkv_bias", "o_bias", "softmax_scale",
                "rope", "kv_from", "kv_quant", "kv_quant_group", "kv_quant_residual", "mlp_hidden", "window",
                "sinks", "output_gate"]


def one_line(err: str) -> bool:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return len(lines) == 1 and "Traceback" not in err


def assert_well_typed(config: kvlab.ModelConfig) -> None:
    """A config that validated holds what its fields promise (no "false" string passed for a bool...)."""
    for obj in [config, config.rope, *config.layers]:
        for name, value in vars(obj).items():
            if isinstance(value, float):
                assert math.isfinite(value), (name, value)
    assert isinstance(config.tie_embeddings, bool) and all(isinstance(s.qkv_bias, bool) for s in config.layers)
    assert all(s.kv_from is None or type(s.kv_from) is int for s in config.layers)


@FAST
@given(st.lists(st.tuples(st.sampled_from(FIELDS), HOSTILE_SCALARS), min_size=1, max_size=3),
       st.lists(st.tuples(st.integers(0, 1), st.sampled_from(LAYER_FIELDS), HOSTILE_SCALARS), max_size=3))
def test_config_parsing_validates_or_raises_config_error(top, per_layer):
    data = copy.deepcopy(BASE)
    for name, value in top:
        data[name] = value
    if isinstance(data.get("layers"), list):
        for index, name, value in per_layer:
            if index < len(data["layers"]) and isinstance(data["layers"][index], dict):
                data["layers"][index][name] = value
    try:
        config = kvlab.ModelConfig.from_dict(data)
    except KvlabError as exc:
        assert isinstance(exc, (ValueError, TypeError)) and len(str(exc).splitlines()) == 1
        return
    assert_well_typed(config)
    assert kvlab.plan(config, context=16).total_bytes >= 0


@FAST
@given(document=st.recursive(HOSTILE_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                              st.dictionaries(st.text(max_size=3), inner, max_size=3)),
                    max_leaves=8))
def test_any_json_document_is_a_config_or_one_line(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("fz") / "config.json"
    try:
        path.write_text(json.dumps(document))
    except ValueError:
        return
    try:
        kvlab.ModelConfig.load(path)
    except KvlabError as exc:
        assert len(str(exc).splitlines()) == 1


# ---- CLI arguments ------------------------------------------------------------------------------------
ARG_VALUES = st.one_of(st.sampled_from(["0", "-1", "1", "2", "16", "nan", "inf", "-inf", "1e400", "1e-400", "", ",",
                                        "1,,2", "abc", "2.5", "99999999999999999999", "1K", "0x10", "-0", " 3 ",
                                        "\u00e9", "--", "1M", "64,256"]),
                       st.integers(-10**12, 10**12).map(str), st.text(max_size=5))


def _flags(command: str) -> list[tuple[str, bool]]:
    """(option, takes a value) of one verb, from its parser."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices[command]
    return [(a.option_strings[-1], a.nargs != 0) for a in sub._actions
            if a.option_strings and a.option_strings[-1] not in ("--help", "--force", "--resume")]


@pytest.mark.parametrize("command", ["plan", "train", "eval", "generate", "compare", "show-mask", "demo"])
@FAST
@given(data=st.data())
def test_every_verb_parses_any_arguments_or_fails_in_one_line(command, data, capsys):
    """argparse level, every verb: any flag with any value parses, or one line and exit 2 (no usage block)."""
    argv = [command]
    for flag, takes_value in data.draw(st.lists(st.sampled_from(_flags(command)), max_size=4)):
        argv += [flag, data.draw(ARG_VALUES)] if takes_value else [flag]
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        err = capsys.readouterr().err
        assert exc.code == 2 and one_line(err), (argv, err)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ck") / "ckpt"
    kvlab.Model(kvlab.ModelConfig.from_dict(copy.deepcopy(BASE))).save(folder)
    (folder.parent / "cfg.json").write_text(json.dumps(BASE))
    return folder


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@SLOW
@given(flags=st.lists(st.sampled_from(["--context", "--batch", "--budget", "--dtype"]), min_size=1, max_size=3),
       data=st.data())
def test_plan_runs_or_fails_in_one_line(ckpt, flags, data, capsys):
    argv = ["plan", str(ckpt.parent / "cfg.json")]
    for flag in flags:
        argv += [flag, data.draw(ARG_VALUES)]
    code, out, err = _run(argv, capsys)
    assert code in (0, 2) and (code == 0 or one_line(err)), (argv, err)
    assert "nan" not in out.lower()


@SLOW
@given(flags=st.lists(st.sampled_from(["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                                       "--stop", "--ids"]), min_size=1, max_size=3), data=st.data())
def test_generate_runs_or_fails_in_one_line(ckpt, flags, data, capsys):
    argv = ["generate", str(ckpt), "--ids", "1,2"]
    for flag in flags:
        value = data.draw(ARG_VALUES)
        if flag == "--max-new-tokens" and value.strip().isdecimal() and int(value) > 8:
            value = "8"  # a valid long generation is slow, not wrong
        argv += [flag, value]
    if "--max-new-tokens" not in flags:
        argv += ["--max-new-tokens", "2"]
    code, out, err = _run(argv, capsys)
    assert code in (0, 2) and (code == 0 or one_line(err)), (argv, err)
    assert code == 2 or "nan" not in err.lower().replace("n/a", "")


@SLOW
@given(flag=st.sampled_from(["--seq", "--layer"]), data=st.data())
def test_show_mask_runs_or_fails_in_one_line(ckpt, tmp_path_factory, flag, data, capsys):
    out = tmp_path_factory.mktemp("sm") / "m"
    value = data.draw(ARG_VALUES)
    if flag == "--seq" and value.strip().isdecimal() and int(value) > 256:
        value = "256"
    code, _, err = _run(["show-mask", str(ckpt.parent / "cfg.json"), "--out", str(out), flag, value], capsys)
    assert code in (0, 2) and (code == 0 or one_line(err)), (flag, value, err)
    assert code == 2 or (out.parent / "m.png").exists()


@SLOW
@given(flag=st.sampled_from(["--lr", "--steps", "--batch", "--seq", "--weight-decay", "--clip", "--warmup",
                             "--seed", "--grad-accum", "--stop-after", "--max-chars"]), data=st.data())
def test_train_runs_or_fails_in_one_line(ckpt, tmp_path_factory, flag, data, capsys):
    corpus = ckpt.parent / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("def f(x):\n    return x + 1\n" * 200)
    value = data.draw(ARG_VALUES)
    fixed = {"--steps": "2", "--batch": "2", "--seq": "16", "--grad-accum": "1"}
    if flag in fixed and value.strip().lstrip("-").isdecimal() and int(value) > int(fixed[flag]):
        value = fixed[flag]  # valid but slow
    out = tmp_path_factory.mktemp("tr") / "run"
    argv = ["train", "--no-progress", "--config", str(ckpt.parent / "cfg.json"), "--corpus", str(corpus),
            "--out", str(out), "--eval-batches", "1", *[x for k, v in fixed.items() if k != flag for x in (k, v)],
            flag, value]
    code, _, err = _run(argv, capsys)
    assert code in (0, 2) and one_line(err), (argv, err)  # success prints one summary line too
    if code == 0:
        assert "nan" not in err.lower()
