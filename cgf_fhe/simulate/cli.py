"""``cgf-fhe simulate``: encrypted-vs-plaintext accuracy of an exported model on MRPC dev."""
from __future__ import annotations

from ..ckks import CoeffBitsAction


def register(sub) -> None:
    p = sub.add_parser(
        "simulate", help="run the exported server graph under plain / emulated / real (TenSEAL) CKKS",
        description="Client part (tokenize, embed, embedding LayerNorm) in plaintext from the checkpoint named in the "
                    "ONNX metadata; server graph under --backend; the plain backend on the same examples as the "
                    "baseline. Writes DIR/simulation.json, DIR/simulation.md and DIR/error_per_layer.png.")
    p.add_argument("model", help="exported ONNX file (cgf-fhe export)")
    p.add_argument("--backend", choices=("plain", "emulate", "tenseal", "seal"), default="emulate",
                   help="plain: float64 reference; emulate: CKKS emulation (fast); tenseal: real CKKS, examples in "
                        "the slots; seal: real CKKS packed (one example per pass, rotations; resumable) "
                        "(default emulate)")
    p.add_argument("--compare-emulator", action="store_true",
                   help="seal: also run the emulator's matching mode on each example; per-layer error mean/std "
                        "of both against plain")
    p.add_argument("--dry-run", action="store_true",
                   help="seal: only the packed dry run (no encryption): refuses unpackable nodes, writes operation "
                        "counts per layer and time/memory estimates to DIR/seal_dry_run.json")
    p.add_argument("-o", "--output", "--output-dir", dest="output_dir", required=True, metavar="DIR",
                   help="folder for simulation.json, simulation.md and error_per_layer.png (created; locked while "
                        "writing)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N dev examples (default: all)")
    p.add_argument("--examples", type=parse_examples, default=None, metavar="SPEC",
                   help="seal: only these dev example indices, 0-based, e.g. 1,3-5 (two runs with disjoint SPECs "
                        "share the work of one --limit run; the summary covers the examples in -o DIR)")
    p.add_argument("--data-dir", default=None, metavar="D", help="MRPC folder (train.tsv, validation.tsv)")
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="checkpoint for the client part (default: ONNX metadata cgf_fhe.checkpoint)")
    p.add_argument("--max-length", type=int, default=None, help="tokenizer truncation (default: metadata or 128)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="examples per batch (default 32; tenseal: as many as fit the slots, one batch per worker)")
    p.add_argument("--workers", type=int, default=1, metavar="W",
                   help="parallel worker processes, one batch each at a time (default 1)")
    g = p.add_argument_group("CKKS parameters")
    g.add_argument("--poly-modulus", type=int, default=None, metavar="N",
                   help="ring size (default: smallest 128-bit secure N for the chain, >= 8192)")
    g.add_argument("--coeff-bits", action=CoeffBitsAction, default=None,
                   help="coefficient modulus bit sizes, e.g. 60,40,40,60 or 60 40 40 60 (default: 60, scale-bits x L, 60)")
    g.add_argument("--scale-bits", type=int, default=40, help="log2 of the CKKS scale (default 40)")
    g.add_argument("--levels", type=int, default=None, metavar="L",
                   help="levels of a fresh ciphertext (default: the most 128-bit security allows for N, 7 at 16384)")
    g.add_argument("--insecure", action="store_true", help="allow parameters below 128-bit security")
    g.add_argument("--refresh", default="plan", choices=("plan", "none"),
                   help="plan: refresh where cgf_fhe.bootstrap.plan_bootstraps puts them (default); none: fail when "
                        "levels run out")
    e = p.add_argument_group("emulator")
    e.add_argument("--emulate-refresh", choices=("bootstrap", "client"), default="bootstrap",
                   help="what a refresh is under emulate: a bootstrap (bounded input, --bootstrap-bits precision) "
                        "or a client-aided decrypt + re-encrypt (like tenseal) (default bootstrap)")
    e.add_argument("--bootstrap-bits", type=float, default=24.0,
                   help="bootstrap precision: error std = bootstrap-bound * 2^-bits (default 24)")
    e.add_argument("--bootstrap-bound", type=float, default=1024.0,
                   help="bootstrap input bound |v| <= B (default 1024)")
    e.add_argument("--on-overflow", choices=("raise", "garbage"), default="raise",
                   help="value past the modulus / outside the bootstrap bound: clear error or garbage (default raise)")
    e.add_argument("--on-exhausted", choices=("raise", "garbage"), default="raise",
                   help="emulate: multiplication with no level left -> error naming the node, or garbage "
                        "(default raise)")
    e.add_argument("--unpinned-scale", action="store_true",
                   help="emulate exact scale tracking instead of TenSEAL's pinned scale (no scale/q_i bias)")
    e.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (also the datasets library's)")
    p.set_defaults(func=_simulate)


def parse_examples(spec: str) -> tuple[int, ...]:
    """``"1,3-5"`` -> ``(1, 3, 4, 5)``: dev example indices, 0-based, sorted, without repeats."""
    import argparse

    out = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} in {spec!r}: expected indices like 1,3-5") from None
        if a < 0 or b < a:
            raise argparse.ArgumentTypeError(f"{part!r} in {spec!r}: indices are >= 0 and ranges run upwards")
        out.update(range(a, b + 1))
    return tuple(sorted(out))


def config_from_args(args):
    from .params import parse_bits
    from .runner import SimConfig

    return SimConfig(
        backend=args.backend, poly_modulus=args.poly_modulus, coeff_bits=parse_bits(args.coeff_bits),
        scale_bits=args.scale_bits, levels=args.levels, insecure=args.insecure, refresh=args.refresh,
        emulate_refresh=args.emulate_refresh, bootstrap_bits=args.bootstrap_bits,
        bootstrap_bound=args.bootstrap_bound, on_overflow=args.on_overflow, on_exhausted=args.on_exhausted,
        pinned_scale=not args.unpinned_scale, seed=args.seed, limit=args.limit, examples=args.examples, data_dir=args.data_dir,
        checkpoint=args.checkpoint, max_length=args.max_length, batch_size=args.batch_size,
        workers=max(1, args.workers), progress=not args.no_progress,
        compare_emulator=getattr(args, "compare_emulator", False), dry_run=getattr(args, "dry_run", False))


def _simulate(args) -> int:
    from pathlib import Path

    from .report import plural
    from .runner import simulate

    from ..data import check_max_length

    check_max_length(args.max_length)
    cfg = config_from_args(args)
    params = cfg.ckks_params()
    for w in params.warnings:
        print(f"WARNING: {w}")
    if cfg.backend != "plain":
        print(f"CKKS: {params}")
    from ..io import output_lock

    with output_lock(args.output_dir):  # checked, created and locked before any work; one writer at a time
        s = simulate(args.model, cfg, args.output_dir)
    if s.get("dry_run_only"):
        for e in s["examples"]:
            print(f"seal dry run, example {e['index']} ({e['tokens']} tokens): ~{e['estimated_seconds'] / 60:.1f} min, "
                  f"~{e['estimated_peak_bytes'] / 2**30:.1f} GiB peak, {e['counts'].get('mul_pt', 0)} ct x pt, "
                  f"{e['counts'].get('mul_ct', 0)} ct x ct, {e['counts'].get('rotate', 0)} rotations, "
                  f"{e['refreshes']} client-aided refreshes, {e['galois_keys']} Galois keys"
                  + ("" if e.get("matches_plain", True) else
                     f"; PACKING ERROR: logits differ from plain by {e['max_logit_diff_vs_plain']:.3g} "
                     "(a real run refuses this example)"))
        print(f"wrote {Path(args.output_dir) / 'seal_dry_run.json'}")
        return 0
    label = s["refresh_label"]
    ratio = f" (x{s['ratio_to_plain']:.2f} plain)" if s.get("ratio_to_plain") else ""
    print(f"{s['backend']}: {s['n_examples']} examples, accuracy {s['accuracy']:.4f} "
          f"(plain {s['plain_accuracy']:.4f}), F1 {s['f1']:.4f}, agreement {100 * s['agreement']:.2f}%, "
          f"max |logit err| {s['max_logit_error']:.3g}, {s['refreshes']} {plural(label)} per inference "
          f"({s['refresh_operations']} performed), {s['seconds']:.1f}s{ratio}")
    print(f"wrote {Path(args.output_dir) / 'simulation.json'}, simulation.md, error_per_layer.png")
    return 0
