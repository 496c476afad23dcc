"""``kvlab <command>``. Each file in this package is one command: it defines ``add_parser(subparsers)``
and ``run(args) -> int``. Errors a user can cause print one line and exit 2; no traceback."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    import kvlab

    parser = argparse.ArgumentParser(prog="kvlab", description="Build, convert and measure attention "
                                     "whose KV cache is smaller.")
    parser.add_argument("--version", action="version", version=f"kvlab {kvlab.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import kvlab.cli as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"kvlab.cli.{info.name}")
        command = module.add_parser(sub)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from kvlab.errors import KvlabError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except KvlabError as exc:
        print(f"kvlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"kvlab {args.command}: error: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kvlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `kvlab plan ... | head`: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
