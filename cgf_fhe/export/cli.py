"""Export-stage commands: ``export``, ``check``, ``report``, ``calibrate-costs``."""
from __future__ import annotations

import argparse

from ..ckks import CoeffBitsAction


def _reps(text: str) -> int:
    """``--reps``: an integer >= 1 (a median needs at least one measurement), else argparse's one-line error."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"reps must be an integer >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"reps must be >= 1, got {n}")
    return n


def _export(args) -> int:
    from ..io import check_output_file

    check_output_file(args.output, "export output")  # before loading anything: -o naming a folder is an error
    if args.verify:
        from ..data import check_max_length

        check_max_length(args.max_length)
    from .onnx_export import run_export

    return run_export(args)


def _check(args) -> int:
    from .verify import run_check

    return run_check(args)


def _report(args) -> int:
    if args.output_dir:
        from ..io import check_output_dir

        check_output_dir(args.output_dir, "report output directory")
    from .report import run_report

    return run_report(args)


def _calibrate(args) -> int:
    from ..io import check_output_file

    check_output_file(args.output, "cost table output")
    from .costs import run_calibrate

    return run_calibrate(args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint's server part (encoder + pooler + classifier) to ONNX",
                       description="Export split.ServerModel(fold_for_export(model)) of a checkpoint to ONNX with "
                                   "inputs 'embeddings' (encrypted) and 'attention_mask' (public), output 'logits'.")
    p.add_argument("checkpoint", help="checkpoint directory (written by finetune/distill)")
    p.add_argument("-o", "--output", required=True, help="output .onnx file")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--no-fold", dest="fold_layernorms", action="store_false",
                   help="do not fold the Newton LayerNorms into the neighbouring linear maps (cgf_fhe.fold; 4 levels "
                        "more per layer, and no CGF statistics fold)")
    p.add_argument("--no-fold-stats", dest="fold_stats", action="store_false",
                   help="fold the LayerNorms but not the CGF statistics into the query/key projections (one level "
                        "more per layer after the first)")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="parity check: onnxruntime vs torch on N MRPC dev examples (stored next to the .onnx)")
    p.add_argument("--data-dir", default=None, help="MRPC folder for --verify (default: $CGF_FHE_DATA_DIR or hub)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokenizer max length for --verify (default: the checkpoint's max_length, else 128)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size for --verify")
    p.add_argument("--no-optimize", action="store_true", help="skip the onnxscript graph optimizer")
    p.add_argument("--strict", action="store_true", help="exit 1 when the exported graph fails the FHE check")
    p.set_defaults(func=_export)

    p = sub.add_parser("check", help="FHE verifier: are all operations on encrypted values polynomial?",
                       description="Taint analysis from the encrypted inputs (metadata cgf_fhe.encrypted_inputs or "
                                   "--encrypted). Exit 0 clean, 1 violations, 2 unreadable file.")
    p.add_argument("model", help="any .onnx file")
    p.add_argument("--encrypted", action="append", default=None, metavar="NAME",
                   help="graph input that is encrypted (repeatable; overrides the metadata)")
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="text: a readable verdict and violations (default); json: one machine-readable object")
    p.set_defaults(func=_check)

    p = sub.add_parser("report", help="depth, op counts, bootstrap placement and latency estimate per layer/stage",
                       description="Per-node depth and per layer/stage op counts from the FHE op table; bootstrap "
                                   "placement for a level budget; latency from a cost table. Several files -> "
                                   "comparison table.")
    p.add_argument("models", nargs="+", help="one or more .onnx files")
    p.add_argument("--levels", type=int, default=None, metavar="L",
                   help="level budget of a fresh ciphertext (default: the smallest with no bootstrap)")
    p.add_argument("--scale-bits", type=int, default=40, help="CKKS scale bits (sets log Q and the ring size N)")
    p.add_argument("--cost-table", default=None, metavar="FILE", help="cost table JSON (default: built-in)")
    p.add_argument("--encrypted", action="append", default=None, metavar="NAME",
                   help="encrypted graph input (repeatable; overrides the metadata)")
    p.add_argument("--seq-len", type=int, default=None, metavar="S",
                   help="sequence length for op counts (default: metadata cgf_fhe.seq_len or 128)")
    p.add_argument("--packing", choices=("element", "packed", "slots", "row"), default="element",
                   help="packing whose op costs are counted: element (one ciphertext per tensor element, examples "
                        "in the slots; what simulate runs) or packed (a token's vector per ciphertext, rotations); "
                        "slots/row are the former names")
    p.add_argument("--packed-seal", action="store_true",
                   help="also count the packed SEAL schedule (simulate --backend seal) per layer: its dry run on "
                        "random embeddings of --seq-len tokens (minutes for MiniLM at 128 tokens)")
    p.add_argument("--format", choices=("table", "json", "md"), default="table",
                   help="what is printed: table (rich tables, default), json, or md (markdown)")
    p.add_argument("--nodes", action="store_true", help="also print the per-node table")
    p.add_argument("-o", "--output", "--output-dir", dest="output_dir", default=None, metavar="DIR",
                   help="write report.json, report.md and PNG plots here")
    p.set_defaults(func=_report)

    p = sub.add_parser("calibrate-costs", help="measure CKKS op latencies with TenSEAL on this machine",
                       description="Measure ct*ct mult, ct*pt mult, add, rotation, encrypt, decrypt and refresh "
                                   "(decrypt + re-encrypt) and write a cost table JSON for `report --cost-table`.")
    p.add_argument("--poly-modulus", type=int, default=16384, help="ring size N (default 16384)")
    p.add_argument("--coeff-bits", action=CoeffBitsAction, default=None,
                   help="coefficient modulus bit sizes, e.g. 60,40,40,60 or 60 40 40 60 "
                        "(default: 60, scale-bits x L, 60 fitting N)")
    p.add_argument("--scale-bits", type=int, default=40, help="log2 of the CKKS scale (default 40)")
    p.add_argument("--reps", type=_reps, default=5, help="repetitions per op, >= 1 (median is stored)")
    p.add_argument("-o", "--output", required=True, help="output JSON")
    p.set_defaults(func=_calibrate)
