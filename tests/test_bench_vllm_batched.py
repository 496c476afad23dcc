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
