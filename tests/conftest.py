"""Test configuration. Technique test files define ``CASES`` (name -> model config dict) and import the
standard matrix from ``matrix.py``; ``pytest_generate_tests`` parametrizes every test that takes
``case`` with that file's cases."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)  # tests run two workers on two cores


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = getattr(metafunc.module, "CASES", {})
        metafunc.parametrize("case", list(cases.values()), ids=list(cases.keys()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
