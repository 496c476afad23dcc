"""Argument types shared by commands: every number a user types is parsed and bounded here, once, with
a one-line message (``argument --lr: must be a finite number, got 'nan'``)."""

from __future__ import annotations

import argparse
import math
import re

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
MAX_TOKENS = 2**40  # no context, length or count kvlab is asked for is larger
MAX_BYTES = 2**70


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit 2); the usage block only with ``--help``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def byte_size(text: str) -> int:
    """'80GiB', '24 GB', '1e9' -> bytes (positive, finite)."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 80GiB, 24GB)")
    try:
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if not math.isfinite(value) or not 1 <= value <= MAX_BYTES:
        raise argparse.ArgumentTypeError(f"must be a size between 1 byte and 1 ZiB, got {text!r}")
    return int(value)


def token_count(text: str) -> int:
    """'32768', '32K', '1M' -> tokens (K = 1024)."""
    match = re.fullmatch(r"\s*([0-9]+)\s*([kKmM]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 4096, 32K, 1M)")
    value = int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[match.group(2).lower()]
    if not 1 <= value <= MAX_TOKENS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_TOKENS:,} tokens, got {text!r}")
    return value


def token_counts(text: str) -> list[int]:
    """'64,256,1K' -> a non-empty list of token counts."""
    values = [token_count(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts (e.g. 64,256,1K), got {text!r}")
    return values


def int_range(low: int, high: int = MAX_TOKENS):
    """An argparse type: an integer in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in {low}..{high:,}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def float_range(low: float, high: float, low_open: bool = False):
    """An argparse type: a finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be a finite number in {bounds}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


positive_int = int_range(1)
nonneg_int = int_range(0)
seed_int = int_range(0, 2**63 - 1)
positive_float = float_range(0.0, 1e6, low_open=True)


def check_new_file(path: str, force: bool, flag: str = "--out") -> None:
    """Refuse to overwrite an existing file the user did not ask to replace (one-line error)."""
    from kvlab.outputs import output_file

    output_file(path, force, flag)


def add_dtype_arg(parser) -> None:
    """``--dtype auto|float32|bfloat16`` (``kvlab.runtime_dtype.resolve_dtype`` reads it)."""
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"],
                        help="weights' dtype (default: the checkpoint's own); auto: bfloat16 only where this "
                        "machine measures it faster, printed on stderr")
