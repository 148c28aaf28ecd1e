"""`cgf-fhe` command line. Each stage registers its own subcommands (``register(subparsers)``)."""
from __future__ import annotations

import argparse
import importlib
import sys

# modules that expose register(subparsers); each adds its subcommands with set_defaults(func=...)
STAGES = (
    "cgf_fhe.training.cli",  # finetune, distill, evaluate, sweep
    "cgf_fhe.export.cli",  # export, check, report, calibrate-costs
    "cgf_fhe.simulate.cli",  # simulate
    "cgf_fhe.pipeline",  # pipeline
)


from .errors import CgfFheError, UserError  # noqa: E402,F401  (UserError re-exported)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cgf-fhe", description=__doc__)
    parser.add_argument("--version", action="version", version="cgf-fhe " + __import__("cgf_fhe").__version__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in STAGES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:  # stage not built yet
                continue
            raise
        m.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except (CgfFheError, FileNotFoundError) as exc:
        print(f"cgf-fhe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # training.engine.TrainingDiverged: a non-finite loss, recorded on disk
        print(f"cgf-fhe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or an unwritable path anywhere a stage did not check itself
        import errno

        where = exc.filename or "(unknown path)"
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            print(f"cgf-fhe {args.command}: error: disk full: {where}", file=sys.stderr)
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR):
            print(f"cgf-fhe {args.command}: error: {exc.strerror}: {where}", file=sys.stderr)
        else:
            raise
        return 2
    except KeyboardInterrupt:
        print(f"cgf-fhe {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
