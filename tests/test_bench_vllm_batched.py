"""The pure helpers of benchmarks/vllm_batched.py (the benchmark itself needs the vLLM venv and minutes)."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _module():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("vllm_batched", BENCH / "vllm_batched.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agreement_counts_positions_and_common_prefixes():
    agreement = _module().agreement
    record = agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 4], [5, 6, 7, 8]])
    assert record == {"positionwise": 7 / 8, "prefix": 6 / 8, "rows_equal": 1, "rows": 2}
    assert agreement([[1, 2]], [[3, 2]])["prefix"] == 0.0


def test_process_seconds_of_this_process_and_of_a_missing_one():
    module = _module()
    assert module.process_seconds(__import__("os").getpid()) > 0
    assert module.process_seconds(2**22 + 12345) == 0.0


def test_engine_phases_split_one_call_by_its_timestamps():
    phases = _module().engine_phases
    stamps = [{"scheduled": 10.0, "first_token": 12.0, "last_token": 15.0},
              {"scheduled": 10.5, "first_token": 12.1, "last_token": 15.5}]
    got = phases(stamps)
    assert abs(got["prefill_s"] - 2.1) < 1e-9 and abs(got["decode_s"] - 3.4) < 1e-9
    assert abs(got["first_token_spread_s"] - 0.1) < 1e-9 and got["method"] == "engine timestamps"
    assert phases(None) is None and phases([]) is None and phases([None]) is None
    assert phases([{"scheduled": 1.0, "first_token": None, "last_token": 2.0}]) is None
