"""`cgf-fhe` command line (also `python -m cgf_fhe`)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import CgfFheError, UserError  # noqa: F401  (UserError re-exported; errors.py imports nothing)

# modules that expose register(subparsers); each adds its subcommands with set_defaults(func=...). They import
# their heavy dependencies (torch, transformers, onnx) inside the commands, so building the parser is fast.
STAGES = (
    "cgf_fhe.training.cli",  # finetune, distill, evaluate, cover, sweep
    "cgf_fhe.export.cli",  # export, check, report, calibrate-costs
    "cgf_fhe.simulate.cli",  # simulate
    "cgf_fhe.pipeline",  # pipeline
)

DESCRIPTION = """\
Privacy-preserving BERT inference under CKKS: train an exact teacher and a CGF (polynomial) student on MRPC,
export the student's server part to ONNX, check it is FHE-friendly, report its depth and latency for a level
budget, and measure its accuracy under plain, emulated or real (TenSEAL) CKKS.

The whole chain in one resumable command:  cgf-fhe pipeline --preset smoke --output runs/smoke
Help on one command:                       cgf-fhe COMMAND --help"""

EPILOG = """\
MRPC is read from --data-dir, else $CGF_FHE_DATA_DIR (a folder with GLUE train.tsv and validation.tsv),
else the datasets hub (glue/mrpc). Errors are one line on stderr with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cgf-fhe", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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


def _quiet_datasets() -> None:
    """--no-progress: also silence the `datasets` library's own bars (``Map: ...``)."""
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"  # read when datasets is first imported
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "no_progress", False):
        _quiet_datasets()
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
