"""``kvlab <command>``. Each file in this package is one command: it defines ``add_parser(subparsers)``
and ``run(args) -> int``. Errors a user can cause print one line and exit 2; no traceback (argparse's too:
see ``_args.OneLineParser``). An unexpected exception is a kvlab bug: one line, exit 1, and the traceback
with ``KVLAB_DEBUG=1``."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    import kvlab
    from kvlab.cli._args import OneLineParser
    from kvlab.plugins import import_submodules

    parser = OneLineParser(prog="kvlab", description="Build, convert and measure attention "
                                     "whose KV cache is smaller.")
    parser.add_argument("--version", action="version", version=f"kvlab {kvlab.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in import_submodules("kvlab.cli"):
        command = module.add_parser(sub)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    from kvlab.errors import KvlabError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    if not getattr(args, "handler", None):
        print("kvlab: error: give a command (kvlab --help lists them)", file=sys.stderr)
        return 2
    try:
        return int(args.handler(args) or 0)
    except KvlabError as exc:
        print(f"kvlab {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:  # a missing file, a full disk, a read-only folder, ...
        if isinstance(exc, BrokenPipeError):  # e.g. `kvlab plan ... | head`: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"kvlab {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"kvlab {args.command}: error: out of memory; lower the sizes asked for", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if "allocate" not in str(exc) and "out of memory" not in str(exc):
            return _internal_error(args.command, exc)
        print(f"kvlab {args.command}: error: out of memory ({str(exc).splitlines()[0][:120]}); lower the sizes "
              "asked for", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kvlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in kvlab, not the user's mistake: still one line
        return _internal_error(args.command, exc)


def _internal_error(command: str, exc: Exception) -> int:
    import os

    if os.environ.get("KVLAB_DEBUG"):
        raise exc
    first = (str(exc).splitlines() or [""])[0][:200]
    print(f"kvlab {command}: internal error: {type(exc).__name__}: {first} (please report it; KVLAB_DEBUG=1 "
          "shows the traceback)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
