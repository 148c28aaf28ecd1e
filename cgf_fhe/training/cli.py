"""CLI of the training stage: ``finetune``, ``distill``, ``evaluate``, ``sweep`` (see :mod:`.api`)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

from .recipes import PRESETS


def _common(p: argparse.ArgumentParser, seeds: bool = True, default_seed: int = 42) -> None:
    g = p.add_argument_group("data and run")
    g.add_argument("--data-dir", help="folder with GLUE MRPC train.tsv/validation.tsv "
                   "(default: $CGF_FHE_DATA_DIR, else the datasets hub glue/mrpc)")
    g.add_argument("--max-length", type=int, help="max tokens per pair (default: the preset's, 128)")
    g.add_argument("--max-train-samples", type=int, help="use only the first N training examples (smoke runs)")
    g.add_argument("--max-eval-samples", type=int, help="use only the first N dev examples (smoke runs)")
    g.add_argument("--device", help="cpu | cuda | mps (default: what accelerate picks)")
    g.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                   help="auto = bf16 autocast on CUDA GPUs that support it, else fp16 + grad scaler on CUDA (float32 for "
                        "polynomial students); float32 on CPU")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from <out>/train_state (finished runs are skipped)")
    g.add_argument("--keep-state", action="store_true", help="keep <out>/train_state/ after a run finishes")
    g.add_argument("--stop-after-epochs", type=int, metavar="N",
                   help="stop after N epochs in total (time-boxing); continue later with --resume")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a finished run already in --output (default: refuse; --resume keeps it)")
    r = p.add_argument_group("recipe (defaults: --preset)")
    r.add_argument("--preset", default="reference", choices=sorted(PRESETS),
                   help="hyper-parameter preset (reference: lr 5e-5, batch 16, 5 epochs, frozen embeddings, "
                        "linear decay no warmup; minilm: lr 1e-4, embeddings trained, 10%% warmup)")
    r.add_argument("--epochs", type=int, help="training epochs (default: the preset's)")
    r.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    r.add_argument("--batch-size", type=int, help="training batch size (default: the preset's)")
    r.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: the preset's)")
    r.add_argument("--warmup-ratio", type=float, help="fraction of steps with linear warm-up (default: the preset's)")
    r.add_argument("--unfreeze-embeddings", action="store_true", help="train the embeddings too")
    r.add_argument("--layer-lr-decay", type=float, metavar="D",
                   help="layer-wise learning-rate decay in (0, 1]: encoder layer i of L at lr*D^(L-i), embeddings "
                        "at lr*D^(L+1), pooler/classifier at lr (default 1 = off)")
    r.add_argument("--evals-per-epoch", type=int, metavar="K",
                   help="evaluate dev K times per epoch (evenly spaced, the last at the epoch's end) and select "
                        "the best checkpoint over all of them (default 1)")
    r.add_argument("--reinit-layers", type=int, metavar="N",
                   help="fine-tuning a backbone: re-initialise its pooler and top N encoder layers first (default 0)")
    r.add_argument("--select-holdout", type=float, metavar="F",
                   help="choose the best checkpoint on a label-stratified fraction F of the training set held out "
                        "from training (the same examples for every seed), not on dev, so the reported dev figure is "
                        "not selected on dev (default 0 = select on dev)")
    r.add_argument("--swap-pairs", action="store_true", default=None,
                   help="also train on every pair with its two sentences swapped (MRPC's label is symmetric)")
    if seeds:
        s = p.add_mutually_exclusive_group()
        s.add_argument("--seed", type=int, default=default_seed, help=f"one seed (default {default_seed}): "
                       "the output folder is the checkpoint")
        s.add_argument("--seeds", type=int, nargs="+", help="a seed set: <out>/seed<S>/ each + <out>/summary.json")


def _opts(args):
    import datasets

    from .api import RunOptions

    datasets.disable_progress_bars()  # tokenizing MRPC takes a second; keep the output to our own bars

    return RunOptions(data_dir=args.data_dir, max_length=args.max_length, max_train_samples=args.max_train_samples,
                      max_eval_samples=args.max_eval_samples, device=args.device,
                      mixed_precision=getattr(args, "mixed_precision", "auto"), resume=getattr(args, "resume", False),
                      progress=not getattr(args, "no_progress", False), keep_state=getattr(args, "keep_state", False),
                      stop_after=getattr(args, "stop_after_epochs", None),
                      calib_batches=getattr(args, "calib_batches", None))


# recipe fields whose flag is not the field name with dashes
RECIPE_FLAGS = {"kd_alpha": "alpha", "kd_beta": "beta", "kd_temperature": "temperature", "kd_ce_weight": "ce-weight",
                "kd_attn_weight": "attn-weight", "freeze_embeddings": "unfreeze-embeddings"}


def _recipe(args, **extra):
    """The recipe of the preset with the flags given; its ranges are checked by :class:`.recipes.Recipe`."""
    from ..errors import UserError
    from .recipes import RecipeError, get_recipe

    kw = dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
              warmup_ratio=args.warmup_ratio, max_length=args.max_length, swap_pairs=args.swap_pairs,
              layer_lr_decay=args.layer_lr_decay, evals_per_epoch=args.evals_per_epoch,
              reinit_layers=args.reinit_layers, select_holdout=args.select_holdout, **extra)
    if args.unfreeze_embeddings:
        kw["freeze_embeddings"] = False
    try:
        return get_recipe(args.preset, **kw)
    except RecipeError as exc:
        flag = RECIPE_FLAGS.get(exc.field, exc.field.replace("_", "-"))
        raise UserError(f"--{flag} {exc.detail}") from None


def _guard_output(args, kind: str) -> None:
    """Refuse an --output that is one of the run's inputs, or that holds a finished run (unless --overwrite or
    --resume): both would be replaced silently by the new checkpoint."""
    from pathlib import Path

    from ..errors import OutputError

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {out} is a file; {kind} writes a checkpoint folder")
    targets = [out] + [out / f"seed{s}" for s in (getattr(args, "seeds", None) or [])]
    for flag in ("teacher", "student_init", "model", "reference"):
        src = getattr(args, flag, None)
        if src and Path(src).exists() and any(Path(src).resolve() == t.resolve() for t in targets):
            raise OutputError(f"--output {out} is the --{flag.replace('_', '-')} input {src}: {kind} would replace "
                              "it; write to another folder")
    if getattr(args, "resume", False) or getattr(args, "overwrite", False):
        return
    for t in targets:
        try:
            s = json.loads((t / "cgf_fhe.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(s, dict) and s.get("status") == "done":
            acc = (s.get("dev") or {}).get("accuracy")
            raise OutputError(f"{t} already holds a finished {s.get('kind', kind)} run"
                              + (f" (dev accuracy {acc:.4f})" if isinstance(acc, float) else "")
                              + "; pass --overwrite to replace it, --resume to keep it, or choose another --output")


def _check_positive(args, *names):
    from ..errors import UserError

    for n in names:
        v = getattr(args, n, None)
        if v is not None and v <= 0:
            raise UserError(f"--{n.replace('_', '-')} must be > 0, got {v}")
    from ..data import check_max_length

    check_max_length(getattr(args, "max_length", None))
    c = getattr(args, "coeff", None)
    if c is not None:
        _check_coeff(c, "--coeff")
    coeffs = getattr(args, "coeffs", None) or []
    for c in coeffs:
        _check_coeff(c, "--coeffs")
    dup = sorted({f"{c:g}" for c in coeffs if sum(f"{x:g}" == f"{c:g}" for x in coeffs) > 1})
    if dup:
        raise UserError(f"--coeffs lists {dup[0]} twice (one run folder c{dup[0]} per coefficient)")


def _check_coeff(c: float, flag: str) -> None:
    """CGF: exp(s - mean - c*var); c <= 0 drops the variance term or inverts it, and c must be a number."""
    import math

    from ..errors import UserError

    if not math.isfinite(c) or c <= 0:
        raise UserError(f"{flag} must be > 0 and finite (the CGF variance weight; 0.5 is the Gaussian value), got {c}")
    if not 0.1 <= c <= 4:
        import sys

        print(f"warning: {flag} {c} is far from the Gaussian value 0.5 (the per-head grid spans 0.25-4)",
              file=sys.stderr)


def cmd_finetune(args) -> int:
    from ..fmt import fmt_best_point
    from . import api

    _check_positive(args, "lr", "max_train_samples", "max_eval_samples")  # lr: Recipe allows 0 (API use)
    if args.softmax == "exact" and args.coeff is not None:
        from ..errors import UserError

        raise UserError("--coeff only applies to --softmax cgf")
    recipe, opts = _recipe(args), _opts(args)
    _guard_output(args, "finetune")
    if args.seeds:
        api.finetune_seeds(args.model, args.output, args.seeds, args.softmax, args.coeff, recipe, opts, args.reference)
    else:
        st = api.finetune(args.model, args.output, args.softmax, args.coeff, args.seed, recipe, opts)
        if st.get("status") == "done" and os.environ.get("RANK", "0") == "0":
            d = st["dev"]
            print(f"{args.output}: dev accuracy {d['accuracy']:.4f}  f1 {d['f1']:.4f}  (n={d['n']}, "
                  f"best epoch {fmt_best_point(st)}, {st['seconds_per_epoch']:.1f} s/epoch)"
                  + (f"; best point chosen on {st['n_select']} held-out training examples (accuracy "
                     f"{st['select']['accuracy']:.4f}), not on dev" if st.get("select") else ""))
    return 0


def _fhe_from_args(args):
    profile = getattr(args, "fhe_profile", None)
    if profile is not None and args.poly == "none":
        args.poly = "all"  # a profile is a choice of polynomials
    if args.poly == "none":
        ignored = [f for f in ("ln", "exp_degree", "gelu_degree", "tanh_degree", "invsqrt_degree", "newton_steps",
                               "margin", "ln_cls_scale", "exp_squarings", "ln_band", "gelu_tail_weight")
                   if getattr(args, f, None) is not None]
        if ignored:
            from ..errors import UserError

            flags = ", ".join("--" + f.replace("_", "-") for f in ignored)
            raise UserError(f"{flags} {'needs' if len(ignored) == 1 else 'need'} --poly all")
        return None
    from .. import surgery

    kw = {"poly": args.poly}
    for f in ("ln", "exp_degree", "exp_squarings", "gelu_degree", "tanh_degree", "invsqrt_degree", "newton_steps",
              "margin", "ln_cls_scale", "gelu_tail_weight"):
        v = getattr(args, f, None)
        if v is not None:
            kw[f] = v
    band = getattr(args, "ln_band", None)
    try:
        opts = surgery.FheOptions.from_profile(profile or "default", **kw)
        if band is not None:  # "max": the calibrated maximum (no band), else a calibrated quantile
            opts = dataclasses.replace(opts, ln_band=None if band == "max" else float(band))
        return opts
    except ValueError as exc:
        from ..errors import UserError

        raise UserError(f"invalid polynomial options: {exc}") from None


def cmd_distill(args) -> int:
    from . import api

    _check_positive(args, "lr", "max_train_samples", "max_eval_samples", "student_layers", "student_hidden")
    if not args.model and not args.teacher:
        from ..errors import UserError

        raise UserError("distill needs --model (the backbone to train the teacher from) or --teacher")
    recipe = _recipe(args, kd_alpha=args.alpha, kd_beta=args.beta, kd_temperature=args.temperature,
                     kd_ce_weight=args.ce_weight, kd_attn_weight=args.attn_weight,
                     coeff_per_head=True if args.coeff_per_head else None, coeff_lr=args.coeff_lr,
                     softmax_blend_epochs=args.softmax_blend_epochs)
    fhe = _fhe_from_args(args)
    from ..errors import UserError

    if fhe is None and (args.no_guard or args.refit or args.blend_epochs is not None or args.epoch_cover):
        raise UserError("--no-guard / --refit / --blend-epochs / --epoch-cover need --poly all")
    if args.blend_epochs is not None and not fhe.any_frozen:
        raise UserError("--blend-epochs needs --ln frozen or frozen-attn (it anneals exact -> frozen LayerNorm)")
    if args.blend_epochs is not None and args.blend_epochs < 0:
        raise UserError(f"--blend-epochs must be >= 0, got {args.blend_epochs}")
    _guard_output(args, "distill")
    api.distill(args.model, args.output, args.teacher, args.coeff, args.seeds, args.seed, recipe, _opts(args),
                fhe=fhe, student_layers=args.student_layers, interval_penalty=args.interval_penalty,
                guard=not args.no_guard, blend_epochs=args.blend_epochs, refit=args.refit,
                epoch_cover=args.epoch_cover, student_hidden=args.student_hidden, student_init=args.student_init,
                softmax=args.student_softmax)
    return 0


def cmd_evaluate(args) -> int:
    from . import api

    opts = _opts(args)
    res = api.evaluate_checkpoint(args.checkpoint, args.softmax, args.coeff, args.split, opts, probe=args.probe,
                                  batch_size=args.batch_size)
    print(json.dumps(res, sort_keys=True))
    return 0


def cmd_cover(args) -> int:
    from . import api

    _check_positive(args, "max_train_samples", "max_eval_samples", "batch_size")
    api.cover(args.checkpoint, args.output, _opts(args), batch_size=args.batch_size)
    return 0


def cmd_sweep(args) -> int:
    from . import api

    _check_positive(args, "lr", "max_train_samples", "max_eval_samples")
    seeds = args.seeds or [args.seed]
    api.sweep(args.model, args.coeffs, args.output, seeds, _recipe(args), _opts(args), with_exact=args.with_exact)
    return 0


def _add_finetune(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="CE fine-tune a classifier on MRPC with the exact or CGF softmax",
                              description="Fine-tune --model (tiny | minilm | hub name | local path | checkpoint) "
                                          "on MRPC; writes the best-on-dev checkpoint to -o.")
    p.add_argument("--model", required=True,
                   help="backbone: tiny (random-init test model), minilm (offline all-MiniLM-L6-v2), a hub name such as "
                        "bert-base-uncased, a local model folder, or a cgf-fhe checkpoint folder")
    p.add_argument("--softmax", choices=["exact", "cgf"], default="exact",
                   help="attention normalisation: exact softmax (default) or CGF (division-free)")
    p.add_argument("--coeff", type=float, help="CGF coefficient c (default 0.5)")
    p.add_argument("--reference", help="multi-seed run folder (or checkpoint) to report the paired difference against")
    p.add_argument("-o", "--output", required=True, help="checkpoint folder to write (with --seeds: seed<S>/ each)")
    _common(p)
    p.set_defaults(func=cmd_finetune)


def _add_distill(subparsers) -> None:
    p = subparsers.add_parser("distill", help="distill an exact teacher into a CGF (optionally polynomial) student",
                              description="KD: alpha*T^2*KL(teacher||student) + beta*mean-layer hidden MSE "
                                          "(+ ce-weight*CE + attn-weight*attention-map error). Trains the exact "
                                          "teacher once into <out>/teacher unless --teacher is given.")
    p.add_argument("--model", help="backbone of the teacher when it must be trained (tiny | minilm | hub name | path)")
    p.add_argument("--teacher", help="exact teacher checkpoint, or a multi-seed folder with seed<S>/ checkpoints")
    p.add_argument("--coeff", type=float, default=0.5, help="CGF coefficient c of the student (default 0.5)")
    p.add_argument("--student-softmax", choices=["cgf", "exact"], default="cgf",
                   help="cgf (default) | exact: the KD control, an exact-softmax student trained the same way, which "
                        "measures what distillation and checkpoint selection cost apart from CGF (not polynomial, "
                        "full width)")
    p.add_argument("--coeff-per-head", action="store_true",
                   help="one CGF coefficient per layer and head instead of --coeff everywhere: each head gets the "
                        "value (from a grid, 0.25-4) whose CGF rows best match the softmax rows (L1) on 512 training "
                        "examples with the student's initial weights; still a plaintext constant (no extra depth)")
    p.add_argument("--coeff-lr", type=float,
                   help="train the CGF coefficients, one per layer and head (as log c, starting from --coeff or "
                        "--coeff-per-head's values), at this learning rate; the trained values are saved as "
                        "plaintext constants like --coeff-per-head's (default 0 = fixed)")
    p.add_argument("--softmax-blend-epochs", type=float, metavar="F",
                   help="anneal the student's attention from the teacher's exact softmax to CGF, linearly per step "
                        "over the first F epochs (weights b*CGF + (1-b)*softmax); dev is always scored with CGF and "
                        "only points reached at b = 1 can be the best checkpoint (default 0: CGF from the start)")
    p.add_argument("--beta", type=float, help="hidden-state MSE weight (default 10)")
    p.add_argument("--alpha", type=float, help="logit KL weight (default 1)")
    p.add_argument("--temperature", type=float, help="KD temperature T (default 1)")
    p.add_argument("--ce-weight", type=float, help="weight of CE on the labels (default 0)")
    p.add_argument("--attn-weight", type=float,
                   help="weight of the attention-map loss: per layer, head and valid query, the L1 distance of the "
                        "student's CGF attention weights to the teacher's softmax weights "
                        "(default 0 = off; full-width students only)")
    _distill_student_args(p)
    p.add_argument("-o", "--output", required=True, help="student checkpoint folder to write (with --seeds: seed<S>/ "
                                                          "each and summary.json)")
    _common(p)
    p.set_defaults(func=cmd_distill)


def _distill_student_args(p) -> None:
    """The FHE-friendly student's flags (polynomials, depth, width, initialisation, training aids)."""
    f = p.add_argument_group("FHE-friendly student (cgf_fhe.surgery)")
    f.add_argument("--poly", choices=["none", "all"], default="none",
                   help="all = replace every non-linearity (exp, GELU, LayerNorm 1/sqrt, tanh) by polynomials")
    f.add_argument("--ln", choices=["newton", "frozen", "frozen-attn"],  # surgery.LN_CHOICES (torch-free here)
                   help="LayerNorm: Newton inverse sqrt, frozen statistics, or frozen-attn (frozen after attention, "
                        "Newton after the FFN: MiniLM's FFN-output LayerNorms cannot be frozen; see "
                        "benchmarks/frozen_ln_probe.py) (unset options: FheOptions defaults)")
    f.add_argument("--fhe-profile", choices=["default", "lean", "lean-b"],  # surgery.PROFILES (torch-free here)
                   help="a named set of approximation choices (implies --poly all; explicit degree flags override "
                        "it): default = FheOptions' defaults (~52 levels per MiniLM layer as trained, 5 fewer "
                        "exported); lean = exp degree 15 with one squaring, GELU degree 15, LayerNorm 1/sqrt degree 15 without "
                        "Newton steps on the 99.9%% variance quantile (27 levels per exported layer; train with "
                        "--interval-penalty and --epoch-cover; does not train on MiniLM); lean-b = exp degree 7 with two "
                        "squarings, GELU degree 31, 1/sqrt degree 15 + one Newton step on the full variance range (31 "
                        "levels per exported MiniLM layer; trains on MiniLM)")
    f.add_argument("--exp-degree", type=int, help="degree of the exp polynomial (default: the profile's)")
    f.add_argument("--exp-squarings", type=int, metavar="K",
                   help="range reduction of exp: fit exp(x/2^K) and square K times (K more levels; default: the "
                        "profile's; the default profile picks K per layer)")
    f.add_argument("--gelu-degree", type=int, help="degree of the GELU polynomial (default: the profile's)")
    f.add_argument("--gelu-tail-weight", type=float, metavar="W",
                   help="fit GELU by least squares that weights its calibrated 0.01%%-99.99%% quantile band fully and "
                        "the tails (massive-activation tokens) by W in (0, 1], e.g. 0.1, instead of interpolating on "
                        "the whole interval: a low degree keeps its error where few inputs are (same interval, depth)")
    f.add_argument("--tanh-degree", type=int, help="degree of the pooler's tanh polynomial (default: the profile's)")
    f.add_argument("--invsqrt-degree", type=int,
                   help="degree of LayerNorm's 1/sqrt starting polynomial (default: the profile's)")
    f.add_argument("--newton-steps", type=int,
                   help="Newton steps refining LayerNorm's 1/sqrt (default: the profile's)")
    f.add_argument("--margin", type=float, help="relative widening of the calibrated intervals")
    f.add_argument("--ln-band", choices=["max", "0.99", "0.999", "0.9999"],
                   help="top of each Newton LayerNorm's variance interval: the calibrated maximum, or a calibrated "
                        "quantile (tokens above it must be pulled in by --interval-penalty or they make the "
                        "unclamped polynomial explode; default: the profile's, 0.999 for lean)")
    f.add_argument("--ln-cls-scale", action=argparse.BooleanOptionalAction, default=None,
                   help="per-position variance scale of Newton LayerNorms: where the [CLS] token's median variance is "
                        "> 8x the other tokens', position 0's variance is scaled down by that ratio before the 1/sqrt "
                        "polynomial (no extra level; default: the profile's, on for lean)")
    f.add_argument("--calib-batches", type=int, help="calibrate on this many training batches (default: all)")
    f.add_argument("--student-layers", type=int, metavar="K", help="keep K encoder layers of the teacher")
    f.add_argument("--student-hidden", type=int, metavar="H",
                   help="narrow student of hidden size H (a multiple of the teacher's head size, below its hidden "
                        "size; MiniLM: 32, 64, ..., 352): teacher embeddings projected on the top-H principal "
                        "directions of its hidden states, random-init encoder, hidden KD on the projected states. With "
                        "--poly all, distill a non-polynomial one first and pass it as --student-init")
    f.add_argument("--student-init", metavar="CKPT",
                   help="start from this finished non-polynomial distill student (or a --seeds folder: its seedS/ "
                        "for seed S): a full-width one (its weights and "
                        "layer map replace the teacher's weights) or a narrow one (its weights and projection replace "
                        "the random init); --student-hidden/--student-layers default to its own. With --poly all: "
                        "the polynomial intervals are calibrated on, and training continues from, that student")
    f.add_argument("--interval-penalty", type=float, default=0.0, metavar="W",
                   help="weight of the penalty on inputs outside the polynomial intervals")
    f.add_argument("--no-guard", action="store_true",
                   help="do not clamp polynomial inputs into their intervals while training (the guard is a "
                        "plaintext training aid; dev metrics are always measured without it)")
    f.add_argument("--blend-epochs", type=float, metavar="F",
                   help="--ln frozen / frozen-attn: anneal exact -> frozen LayerNorm linearly per step over the "
                        "first F epochs (default: half of --epochs; 0 = frozen from the start; must be < --epochs). "
                        "Only epochs that end at blend 1 can be the best checkpoint")
    f.add_argument("--refit", action="store_true",
                   help="--ln frozen / frozen-attn with --blend-epochs > 0: when the blend reaches 1, re-measure "
                        "the ranges on the training data and refit the exp/GELU/tanh polynomials (default: keep the "
                        "intervals calibrated on the exact-LayerNorm model). Experimental: wider intervals can add "
                        "depth")
    f.add_argument("--epoch-cover", action="store_true",
                   help="at the end of every epoch, before scoring it, widen each interval that epoch's training "
                        "inputs left (like `cgf-fhe cover`, from the counters training keeps anyway), so the "
                        "best-checkpoint choice scores what `cover` + export will run; the best epoch's "
                        "polynomials are saved with its weights")


def _add_evaluate(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="score a checkpoint on MRPC; prints one JSON object",
                              description='Prints {"accuracy", "f1", "n", ...}; polynomial students add '
                                          'out-of-interval counts; --probe scores the same weights with both softmaxes.')
    p.add_argument("checkpoint", help="checkpoint folder (written by finetune/distill/cover)")
    p.add_argument("--softmax", choices=["exact", "cgf"], help="override the checkpoint's softmax")
    p.add_argument("--coeff", type=float, help="override the CGF coefficient")
    p.add_argument("--split", default="validation", choices=["train", "validation"],
                   help="MRPC split to score (default validation, the dev set)")
    p.add_argument("--probe", action="store_true", help="also score with each softmax (exact vs CGF probe)")
    p.add_argument("--data-dir", help="folder with GLUE MRPC train.tsv/validation.tsv (default: $CGF_FHE_DATA_DIR, else the datasets hub)")
    p.add_argument("--max-length", type=int, help="default: the checkpoint's training max length")
    p.add_argument("--max-eval-samples", type=int, help="use only the first N dev examples")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    p.add_argument("--device", help="cpu | cuda | mps (default: the best available)")
    p.set_defaults(func=cmd_evaluate, max_train_samples=None)


def _add_cover(subparsers) -> None:
    p = subparsers.add_parser(
        "cover", help="widen the polynomial intervals a trained student's inputs leave (no retraining)",
        description="Measures every polynomial op's input range on the training data in the training form (guard "
                    "on), refits only the ops whose range exceeds their interval (union of both; same degree, "
                    "Newton LayerNorm may take more steps) and saves the student with the new intervals. The "
                    "guard hides such inputs during distillation; unclamped, a Newton LayerNorm past its interval "
                    "diverges and the exported form gives NaN logits. CHECKPOINT may be a --seeds folder.")
    p.add_argument("checkpoint", help="a polynomial student (distill --poly all), or a --seeds folder of them")
    p.add_argument("-o", "--output", required=True, help="folder for the covered student (seed*/ for a seed set)")
    p.add_argument("--data-dir", help="folder with GLUE MRPC train.tsv/validation.tsv (default: $CGF_FHE_DATA_DIR, else the datasets hub)")
    p.add_argument("--max-train-samples", type=int, help="measure on the first N training pairs (default: all)")
    p.add_argument("--max-eval-samples", type=int, help="use only the first N dev examples")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    p.add_argument("--device", help="cpu | cuda | mps (default: the best available)")
    p.add_argument("--resume", action="store_true", help="skip outputs already covered from the same checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_cover, max_length=None)


def _add_sweep(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="CE-only CGF fine-tunes for several coefficients (table + sweep.json)")
    p.add_argument("--model", required=True, help="backbone: tiny (random-init test model), minilm (offline all-MiniLM-L6-v2), a hub name such as "
                        "bert-base-uncased, a local model folder, or a cgf-fhe checkpoint folder")
    p.add_argument("--coeffs", type=float, nargs="+", required=True, metavar="C",
                   help="CGF coefficients to fine-tune one model each with, e.g. 0.5 0.65 0.8")
    p.add_argument("--with-exact", action="store_true", help="also fine-tune exact on the same seeds (paired diffs)")
    p.add_argument("-o", "--output", required=True, help="folder for one checkpoint per coefficient and sweep.json")
    _common(p)
    p.set_defaults(func=cmd_sweep)


def register(subparsers) -> None:
    """The training commands: finetune, distill, evaluate, cover, sweep."""
    _add_finetune(subparsers)
    _add_distill(subparsers)
    _add_evaluate(subparsers)
    _add_cover(subparsers)
    _add_sweep(subparsers)
