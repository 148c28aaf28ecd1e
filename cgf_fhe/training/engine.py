"""The one training loop: :func:`fit` with a pluggable per-batch step (:class:`CEStep`, :class:`KDStep`).

What it does per run:

* seeds python / numpy / torch (:func:`set_seed`);
* AdamW (no weight decay on 1-D parameters: biases, LayerNorm weights), linear decay with optional warmup,
  gradient clipping; embeddings frozen unless the recipe says otherwise;
* HF Accelerate for device placement, AMP and multi-GPU: ``accelerate launch cgf-fhe finetune ...`` runs
  data-parallel (each process sees its shard of every epoch through a ``DistributedSampler``); on CUDA
  it trains in bf16 autocast where the GPU supports it, else fp16 with a gradient scaler (float32 for
  polynomial students; ``mixed_precision="auto"``, see :func:`resolve_precision`), on CPU in float32;
* after every epoch (and, with ``recipe.evals_per_epoch = K > 1``, at K-1 evenly spaced points inside it):
  dev accuracy / F1, best-weights selection over all those points on dev accuracy (strictly better wins;
  mid-epoch points leave every RNG as it was, so they do not change the training trajectory),
  and a resumable state file ``<state_dir>/train_state.pt`` (model, optimizer, scheduler, grad scaler,
  python/numpy/torch/CUDA RNG states, epoch, best metric, history) written with ``torch.save`` of
  tensors and plain containers only and read back with ``torch.load(weights_only=True)``;
* ``resume=True`` continues from that file. The data order of epoch e is a function of (seed, e) only
  and the RNG states are restored, so a resumed single-process run ends in the same state as an
  uninterrupted one (tested). With several processes each rank restores the main rank's RNG state.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models import CheckpointError
from ..softmax import COEFF_PARAM
from .evaluate import evaluate_model, model_inputs
from .kd import kd_loss
from .recipes import Recipe

STATE_FILE = "train_state.pt"
BEST_FILE = "best_model.pt"
STATE_FORMAT = 1


class ResumeError(CheckpointError):
    """The state file cannot be used to resume this run."""


# ---------------------------------------------------------------- seeds / RNG

def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def get_rng_state() -> dict:
    """All RNG states as tensors / plain containers (loadable with weights_only=True)."""
    np_state = np.random.get_state(legacy=False)
    version, internal, gauss = random.getstate()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state({
        "bit_generator": npst["bit_generator"],
        "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
        "has_gauss": npst["has_gauss"],
        "gauss": npst["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ---------------------------------------------------------------- per-batch steps

def _unwrap(model):
    return getattr(model, "module", model)  # DDP / DataParallel wrapper -> the model


class CEStep:
    """Cross-entropy fine-tuning on the labels."""

    name = "ce"

    def __call__(self, model, batch):
        out = model(**model_inputs(batch))
        loss = F.cross_entropy(out.logits.float(), batch["labels"])
        return loss, {}


class KDStep:
    """Distillation from a frozen teacher (see :func:`cgf_fhe.training.kd.kd_loss`).

    ``penalty_fn(model) -> scalar`` (e.g. :func:`cgf_fhe.surgery.interval_penalty`) is added with weight
    ``penalty_weight``; it reads what the student's forward just recorded."""

    name = "kd"

    def __init__(self, teacher, layer_map=None, alpha=1.0, beta=10.0, T=1.0, ce_weight=0.0,
                 penalty_weight=0.0, penalty_fn: Callable | None = None, teacher_proj: torch.Tensor | None = None,
                 attn_weight: float = 0.0):
        self.teacher = teacher
        self.teacher_proj = teacher_proj  # [D, H] for narrow students (see kd.py)
        self.layer_map = list(layer_map) if layer_map is not None else None
        self.alpha, self.beta, self.T, self.ce_weight = alpha, beta, T, ce_weight
        self.attn_weight = attn_weight
        if attn_weight and teacher_proj is not None:
            raise ValueError("the attention-map loss (attn_weight > 0) needs a full-width student: a narrower "
                             "student has other heads than the teacher")
        self.penalty_weight = penalty_weight
        self.penalty_fn = penalty_fn
        if penalty_weight and penalty_fn is None:
            raise ValueError("penalty_weight > 0 needs penalty_fn")
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()

    def prepare(self, accelerator) -> None:
        self.teacher.to(accelerator.device)
        self.teacher.eval()
        if self.teacher_proj is not None:
            self.teacher_proj = self.teacher_proj.to(accelerator.device)

    def __call__(self, model, batch):
        inputs = model_inputs(batch)
        hidden, attn = bool(self.beta), bool(self.attn_weight)
        with torch.no_grad():
            t = self.teacher(**inputs, output_hidden_states=hidden, output_attentions=attn)
        s = model(**inputs, output_hidden_states=hidden, output_attentions=attn)
        loss, parts = kd_loss(
            s.logits, t.logits, s.hidden_states if hidden else None, t.hidden_states if hidden else None,
            self.layer_map, inputs.get("attention_mask"), alpha=self.alpha, beta=self.beta, T=self.T,
            labels=batch.get("labels"), ce_weight=self.ce_weight, return_parts=True, teacher_proj=self.teacher_proj,
            student_attn=s.attentions if attn else None, teacher_attn=t.attentions if attn else None,
            attn_weight=self.attn_weight,
        )
        if self.penalty_weight:
            pen = self.penalty_fn(_unwrap(model))
            loss = loss + self.penalty_weight * pen
            parts["penalty"] = float(pen.detach())
        return loss, parts


# ---------------------------------------------------------------- accelerate

_ACCELERATORS: dict = {}


PRECISIONS = ("auto", "no", "bf16", "fp16")


def has_polynomials(model) -> bool:
    """Whether ``model`` holds polynomial stand-ins (:mod:`cgf_fhe.poly` modules)."""
    from ..poly import IntervalTracker

    return any(isinstance(m, IntervalTracker) for m in model.modules())


def resolve_precision(mixed_precision: str = "auto", device: str | None = None, polynomial: bool = False) -> str:
    """The autocast precision a run uses: ``"auto"`` = bf16 on a CUDA GPU that supports it, else fp16 on CUDA
    (float32 for polynomial students), float32 on CPU. fp16 is refused for polynomial students: a degree-63
    polynomial or a Newton LayerNorm over variances up to 5.5e4 exceeds its range (65504). (The polynomials and
    LayerNorm statistics run in float32 inside autocast anyway, see :func:`cgf_fhe.poly.fp32_island`.)"""
    from ..errors import UserError

    if mixed_precision not in PRECISIONS:
        raise UserError(f"mixed precision {mixed_precision!r}: choose one of {', '.join(PRECISIONS)}")
    cpu = device is not None and str(device).startswith("cpu")
    if mixed_precision == "auto":
        if cpu or not torch.cuda.is_available():
            return "no"
        if torch.cuda.is_bf16_supported():
            return "bf16"
        return "no" if polynomial else "fp16"
    if mixed_precision == "fp16" and polynomial:
        raise UserError("mixed precision fp16 cannot train a polynomial student (its polynomials and LayerNorm "
                        "variances exceed fp16's range 65504); use bf16 or no")
    return mixed_precision


def get_accelerator(device: str | None = None, mixed_precision: str = "auto"):
    """One Accelerator per (cpu, precision) in this process (Accelerate's state is a process singleton, so one
    process keeps one precision: the API resolves ``"auto"`` once per run, see :func:`resolve_precision`)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = device is not None and str(device).startswith("cpu")
    mixed_precision = resolve_precision(mixed_precision, device)
    key = (cpu, mixed_precision)
    if key not in _ACCELERATORS:
        _ACCELERATORS[key] = Accelerator(
            cpu=cpu, mixed_precision=mixed_precision,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
    acc = _ACCELERATORS[key]
    if device is not None and not cpu and torch.device(device).type != acc.device.type:
        from ..errors import UserError

        raise UserError(f"--device {device} is not available here (accelerate picked {acc.device})")
    return acc


# ---------------------------------------------------------------- fit

@dataclass
class FitResult:
    best_metrics: dict
    best_epoch: int
    history: list = field(default_factory=list)
    completed: bool = True
    resumed_from: int | None = None
    best_at: float | None = None  # epochs trained at the best evaluation point (1.5 = half-way through epoch 2)
    best_select: dict | None = None  # selection-set metrics of the best point (fit with a select_dataset)

    @property
    def seconds_per_epoch(self) -> float:
        secs = [h["train_seconds"] for h in self.history]
        return sum(secs) / len(secs) if secs else float("nan")

    def to_dict(self) -> dict:
        return {"best_metrics": self.best_metrics, "best_epoch": self.best_epoch, "history": self.history,
                "completed": self.completed, "resumed_from": self.resumed_from, "best_at": self.best_at,
                "best_select": self.best_select,
                "seconds_per_epoch": self.seconds_per_epoch}


def set_dropout(model, p: float) -> int:
    """Set every ``nn.Dropout`` (incl. the attention-probability dropout) to ``p`` and the config to match."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = float(p)
            n += 1
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
        if getattr(model.config, key, None) is not None:
            setattr(model.config, key, float(p))
    return n


def trainable_parameters(model, freeze_embeddings: bool):
    emb = getattr(model.base_model, "embeddings", None) if hasattr(model, "base_model") else None
    if emb is not None:
        for p in emb.parameters():
            p.requires_grad_(not freeze_embeddings)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def layer_lr_scale(name: str, n_layers: int, decay: float) -> float:
    """Learning-rate factor of parameter ``name`` under layer-wise decay ``decay`` (see Recipe.layer_lr_decay):
    ``decay^(L - i)`` for encoder layer i, ``decay^(L + 1)`` for the embeddings, 1 for the rest."""
    if decay == 1.0:
        return 1.0
    parts = name.split(".")
    if "embeddings" in parts:
        return decay ** (n_layers + 1)
    for j, part in enumerate(parts[:-1]):
        if part == "layer" and j > 0 and parts[j - 1] == "encoder" and parts[j + 1].isdigit():
            return decay ** (n_layers - int(parts[j + 1]))
    return 1.0


def build_optimizer(named_params, recipe: Recipe, n_layers: int | None = None):
    """AdamW; no weight decay on 1-D parameters; with ``recipe.layer_lr_decay != 1`` one group per
    (learning-rate factor, decay) so the scheduler scales every group's own base learning rate. Trainable CGF
    coefficients (``cgf_fhe.softmax.train_head_coeffs``) train at ``recipe.coeff_lr``."""
    decay_f = float(getattr(recipe, "layer_lr_decay", 1.0) or 1.0)
    if not 0.0 < decay_f <= 1.0:
        raise ValueError(f"layer_lr_decay must be in (0, 1], got {decay_f}")
    if decay_f != 1.0 and not n_layers:
        raise ValueError("layer_lr_decay needs the number of encoder layers")
    groups: dict[tuple[float, bool], list] = {}
    for n, p in named_params:
        if n.rsplit(".", 1)[-1] == COEFF_PARAM:  # trainable CGF coefficients: their own rate, no decay
            if not recipe.coeff_lr > 0:
                raise ValueError(f"{n} is trainable but recipe.coeff_lr is {recipe.coeff_lr}")
            groups.setdefault((recipe.coeff_lr / recipe.lr, False), []).append(p)
            continue
        scale = layer_lr_scale(n, n_layers or 0, decay_f)
        groups.setdefault((scale, p.ndim >= 2), []).append(p)
    out = [{"params": ps, "lr": recipe.lr * scale, "weight_decay": recipe.weight_decay if wd else 0.0}
           for (scale, wd), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))]
    return torch.optim.AdamW(out, lr=recipe.lr)


DIVERGED_FILE = "diverged.json"


class TrainingDiverged(FloatingPointError):
    """The training loss became non-finite. ``record`` (JSON-serialisable, also written to
    ``<state_dir>/diverged.json``): where (epoch, step, fraction of the run), the loss and its parts at that
    step, the schedule's blends, the mean loss so far in the epoch, and the history of the evaluation points
    reached (finished epochs and this epoch's mid-epoch points)."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


def _finite_or_text(v: float):
    return v if math.isfinite(v) else str(v)


def _diverged(desc: str, loss: float, parts: dict, *, epoch: int, step: int, at: float, epochs: int,
              mean_before: float | None, schedule, history: list, state_dir: Path | None,
              write: bool) -> TrainingDiverged:
    """The :class:`TrainingDiverged` for a non-finite ``loss``; its record is written to ``state_dir`` if ``write``."""
    record = {"epoch": epoch, "step": step, "at": round(at, 4), "loss": str(loss),
              "parts": {k: _finite_or_text(float(v)) for k, v in parts.items()}, "mean_loss_before": mean_before,
              "blend": schedule.blend if getattr(schedule, "frozen", False) else None,
              "softmax_blend": getattr(schedule, "softmax_blend", None), "history": history}
    path = state_dir / DIVERGED_FILE if state_dir is not None else None
    if path is not None and write:
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    where = (f"step {step} (epoch {record['at']:g} of {epochs}"
             + (f", frozen-LayerNorm blend {record['blend']:.3g}" if record["blend"] is not None else "") + ")")
    return TrainingDiverged(f"[{desc}] training diverged: loss {loss} at {where}; parts "
                            + ", ".join(f"{k} {v}" for k, v in record["parts"].items())
                            + (f"; recorded in {path}" if path is not None else ""), record)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_state(path: str | os.PathLike) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ResumeError(f"cannot read training state {path}: {type(exc).__name__}: {exc}") from exc


def _norm(v):
    """Fingerprint values compared for resume: keys holding None (settings added later, unset) do not count."""
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items() if x is not None}
    return v


def eval_steps(steps_per_epoch: int, evals_per_epoch: int = 1) -> set[int]:
    """The 1-based batch counts within an epoch after which dev is evaluated: ``evals_per_epoch`` points
    evenly spaced, the last one always the epoch's end (``ceil(k * n / K)`` for k = 1..K; fewer when an
    epoch has fewer batches than evaluations)."""
    k = int(evals_per_epoch)
    if k < 1:
        raise ValueError(f"evals_per_epoch must be >= 1, got {evals_per_epoch}")
    n = int(steps_per_epoch)
    return {max(1, math.ceil(i * n / k)) for i in range(1, k + 1)} if n > 0 else set()


def fit(model, step, train_dataset, eval_dataset, collate_fn, recipe: Recipe, seed: int = 42,
        state_dir: str | os.PathLike | None = None, resume: bool = False, device: str | None = None,
        mixed_precision: str = "auto", progress: bool = True, stop_after: int | None = None,
        desc: str = "train", log: Callable[[str], None] | None = None, keep_best: bool = True,
        run_info: dict | None = None, schedule=None, select_dataset=None) -> FitResult:
    """Train ``model`` in place with ``step`` and leave the best-on-dev weights in it.

    ``select_dataset`` (e.g. a part of the training set held out from training): choose the best point on its
    accuracy instead of dev's, so that the dev metrics reported for that point are not selected on dev. Each
    point's record then has ``select`` (its metrics) next to ``dev``; ``best_metrics`` stays dev's.

    ``step(model, batch) -> (loss, {name: float})``; it may define ``prepare(accelerator)``.
    ``stop_after``: stop (as if interrupted) once this many epochs are done in total; the run can be
    continued with ``resume=True``. ``keep_best=False`` leaves the last epoch's weights instead of the
    best-on-dev ones (the best metrics are still reported). ``run_info``: JSON-like description of the run
    (softmax, coefficient, KD weights, ...) stored in the state; ``resume`` refuses a state whose
    description differs. ``schedule`` (e.g. :class:`cgf_fhe.training.poly_train.StudentSchedule`): an object with
    ``on_step(model, step, steps_per_epoch)`` called before every training step (``step`` = 0-based global step,
    a function of the epoch and batch only, so resumed runs follow the same schedule), ``exported_form(model)``
    (context manager the dev evaluation runs in) and ``epoch_info(model, evaluate, diagnostics) -> dict`` merged
    into the evaluation point's history record (``diagnostics`` is False at mid-epoch points: skip extra
    passes); an epoch whose info has ``"eligible": False`` is never chosen as the best. Optional
    hooks: ``on_epoch_end(model)`` after the training steps before every evaluation point (an epoch's end, and
    the mid-epoch points of ``recipe.evals_per_epoch``), before that evaluation, and
    ``on_best(model)`` when an evaluation point becomes the best. If it
    has ``state_dict()`` / ``load_state_dict(model, state)``, its state is saved with (and restored from) the
    training state, after the model weights.
    Returns a :class:`FitResult`.
    """
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers import get_linear_schedule_with_warmup

    if recipe.epochs < 1:
        raise ValueError("epochs must be >= 1")
    acc = get_accelerator(device, resolve_precision(mixed_precision, device, has_polynomials(model)))
    main = acc.is_main_process
    log = log or (lambda msg: tqdm.write(msg) if main else None)
    state_dir = Path(state_dir) if state_dir is not None else None
    if state_dir is not None and main:
        state_dir.mkdir(parents=True, exist_ok=True)

    set_seed(seed)
    sampler = DistributedSampler(train_dataset, num_replicas=acc.num_processes, rank=acc.process_index,
                                 shuffle=True, seed=seed, drop_last=False)
    train_loader = DataLoader(train_dataset, batch_size=recipe.batch_size, sampler=sampler, collate_fn=collate_fn)
    eval_loader = DataLoader(eval_dataset, batch_size=recipe.eval_batch_size, shuffle=False, collate_fn=collate_fn)
    select_loader = None if select_dataset is None else DataLoader(
        select_dataset, batch_size=recipe.eval_batch_size, shuffle=False, collate_fn=collate_fn)

    model.to(acc.device)
    named = trainable_parameters(model, recipe.freeze_embeddings)
    if not named:
        raise ValueError("no trainable parameters")
    optimizer = build_optimizer(named, recipe, getattr(getattr(model, "config", None), "num_hidden_layers", None))
    total_steps = len(train_loader) * recipe.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(recipe.warmup_ratio * total_steps), total_steps)
    model, optimizer = acc.prepare(model, optimizer)
    if hasattr(step, "prepare"):
        step.prepare(acc)
    params = [p for _, p in named]

    fingerprint = {"seed": int(seed), "epochs": int(recipe.epochs), "batch_size": int(recipe.batch_size),
                   "lr": float(recipe.lr), "n_train": len(train_dataset), "num_processes": acc.num_processes,
                   "step": getattr(step, "name", type(step).__name__), "run": run_info or {},
                   "n_select": len(select_dataset) if select_dataset is not None else 0}
    start_epoch, best, best_epoch, history, resumed_from = 0, None, 0, [], None
    best_at = None  # {"at": epochs trained (fractional), "step": global step} of the best evaluation point
    best_select = None  # the selection-set metrics of the best point (select_dataset given)
    best_state_mem = None
    state_path = state_dir / STATE_FILE if state_dir is not None else None
    best_path = state_dir / BEST_FILE if state_dir is not None else None

    if resume:
        if state_path is None:
            raise ResumeError("resume needs a state directory")
        if state_path.is_file():
            st = load_state(state_path)
            if st.get("format") != STATE_FORMAT:
                raise ResumeError(f"{state_path}: unknown state format {st.get('format')!r}")
            saved_fp = st["fingerprint"]  # keys a state file does not have (older versions) are not compared
            diff = {k: (saved_fp[k], v) for k, v in fingerprint.items() if k in saved_fp and _norm(saved_fp[k]) != _norm(v)}
            if diff:
                detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
                raise ResumeError(f"{state_path} was written by a different run ({detail}); "
                                  "use another output folder or drop --resume")
            _unwrap(model).load_state_dict(st["model"])
            optimizer.load_state_dict(st["optimizer"])
            scheduler.load_state_dict(st["scheduler"])
            if acc.scaler is not None and st.get("scaler"):
                acc.scaler.load_state_dict(st["scaler"])
            set_rng_state(st["rng"])
            if schedule is not None and hasattr(schedule, "load_state_dict"):
                schedule.load_state_dict(_unwrap(model), st.get("schedule") or {})
            start_epoch, history = int(st["epoch"]), list(st["history"])
            best, best_epoch = st["best"]["metrics"], int(st["best"]["epoch"])
            best_select = st["best"].get("select")
            if "at" in st["best"]:
                best_at = {"at": float(st["best"]["at"]), "step": int(st["best"]["step"])}
            resumed_from = start_epoch
            log(f"[{desc}] resuming after epoch {start_epoch}/{recipe.epochs} " + (
                f"(best dev accuracy {best['accuracy']:.4f} at epoch {best_epoch})" if best
                else "(no eligible epoch yet)"))
        else:
            log(f"[{desc}] --resume: no state at {state_path}, starting from scratch")

    completed = True
    steps_per_epoch = len(train_loader)
    eval_points = eval_steps(steps_per_epoch, getattr(recipe, "evals_per_epoch", 1))
    global_step = start_epoch * steps_per_epoch

    def _evaluate(loader=eval_loader):
        return evaluate_model(_unwrap(model), loader, acc.device, autocast=acc.autocast)

    def _score(mid: bool = False):
        """Dev metrics of the model as it is now (exported form for a schedule) + the schedule's info.
        ``mid``: a mid-epoch point, where the schedule skips its diagnostic passes (training-form dev)."""
        info = {}
        if schedule is not None and hasattr(schedule, "on_epoch_end"):
            schedule.on_epoch_end(_unwrap(model))
        if schedule is not None:
            with schedule.exported_form(_unwrap(model)):
                dev = _evaluate()
                if select_loader is not None:
                    info["select"] = _evaluate(select_loader)
            info.update(schedule.epoch_info(_unwrap(model), _evaluate, diagnostics=not mid))
        else:
            dev = _evaluate()
            if select_loader is not None:
                info["select"] = _evaluate(select_loader)
        return dev, info

    def _consider(dev, info, epoch_no, at, step_no) -> bool:
        """Best-checkpoint selection over every evaluation point (strictly better accuracy wins), on the
        selection set if there is one, else on dev."""
        nonlocal best, best_epoch, best_at, best_select, best_state_mem
        now = info.get("select", dev)
        held = best_select if select_loader is not None else best
        if not (info.get("eligible", True) and (best is None or held is None or now["accuracy"] > held["accuracy"])):
            return False
        best, best_epoch, best_at = dev, epoch_no, {"at": at, "step": step_no}
        best_select = info.get("select")
        if schedule is not None and hasattr(schedule, "on_best"):
            schedule.on_best(_unwrap(model))
        sd = {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}
        if best_path is not None:
            if main:
                _atomic_save(sd, best_path)
        else:
            best_state_mem = sd
        return True

    for epoch in range(start_epoch, recipe.epochs):
        if stop_after is not None and epoch >= stop_after:
            completed = False
            break
        sampler.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        mid_seconds = 0.0  # time spent in mid-epoch evaluations (not training)
        total, count, part_sums, mids = 0.0, 0, {}, []
        bar = tqdm(train_loader, desc=f"{desc} epoch {epoch + 1}/{recipe.epochs}", disable=not (progress and main),
                   leave=False, dynamic_ncols=True)
        for batch in bar:
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            if schedule is not None:
                schedule.on_step(_unwrap(model), global_step, steps_per_epoch)
            global_step += 1
            with acc.autocast():
                loss, parts = step(model, batch)
            if not torch.isfinite(loss.detach()):
                raise _diverged(desc, float(loss.detach()), parts, epoch=epoch + 1, step=global_step,
                                at=epoch + (count + 1) / steps_per_epoch, epochs=recipe.epochs,
                                mean_before=total / count if count else None, schedule=schedule,
                                history=history + ([{"epoch": epoch + 1, "mid_evals": mids}] if mids else []),
                                state_dir=state_dir, write=main)
            acc.backward(loss)
            if recipe.max_grad_norm:
                acc.clip_grad_norm_(params, recipe.max_grad_norm)
            optimizer.step()
            if not acc.optimizer_step_was_skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach())
            count += 1
            for k, v in parts.items():
                part_sums[k] = part_sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{total / count:.4f}", **{k: f"{v / count:.4f}" for k, v in part_sums.items()})
            if count in eval_points and count < steps_per_epoch:
                # a mid-epoch evaluation point: RNG-neutral (the eval loader draws a seed from the global
                # generator), so the training trajectory is the same as with one evaluation per epoch
                tm = time.perf_counter()
                rng = get_rng_state()
                dev, info = _score(mid=True)
                set_rng_state(rng)
                model.train()
                at = round(epoch + count / steps_per_epoch, 4)
                improved = _consider(dev, info, epoch + 1, at, global_step)
                mids.append({"at": at, "step": global_step, "train_loss": total / count, "dev": dev,
                             "eval_seconds": time.perf_counter() - tm, **info})
                mid_seconds += time.perf_counter() - tm
                log(f"[{desc}] epoch {at:g}/{recipe.epochs} (step {global_step}): dev acc {dev['accuracy']:.4f} "
                    f"f1 {dev['f1']:.4f}" + _select_text(info) + ("  *best*" if improved else "")
                    + ("" if info.get("eligible", True) else "  (not eligible: blend < 1)"))
        bar.close()
        train_seconds = time.perf_counter() - t0 - mid_seconds

        t1 = time.perf_counter()
        dev, info = _score()
        eval_seconds = time.perf_counter() - t1
        record = {"epoch": epoch + 1, "train_loss": total / max(count, 1),
                  **{f"train_{k}": v / max(count, 1) for k, v in part_sums.items()},
                  "dev": dev, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                  "lr": float(scheduler.get_last_lr()[0]), **info}
        if mids:
            record["mid_evals"] = mids
        history.append(record)
        eligible = info.get("eligible", True)
        improved = _consider(dev, info, epoch + 1, float(epoch + 1), global_step)
        log(f"[{desc}] epoch {epoch + 1}/{recipe.epochs}: loss {record['train_loss']:.4f}  dev acc "
            f"{dev['accuracy']:.4f} f1 {dev['f1']:.4f}{_select_text(info)}  ({train_seconds:.1f}s train, "
            f"{eval_seconds:.1f}s eval)"
            + (f"  [training form: dev acc {info['dev_training_form']['accuracy']:.4f}, blend {info['blend']:.3g}"
               + (f", softmax blend {info['softmax_blend']:.3g}" if "softmax_blend" in info else "") + "]"
               if "dev_training_form" in info else "")
            + ("  *best*" if improved else "") + ("" if eligible else "  (not eligible: blend < 1)"))
        if state_path is not None and main:
            _atomic_save({
                "format": STATE_FORMAT, "epoch": epoch + 1, "fingerprint": fingerprint,
                "model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "rng": get_rng_state(),
                "best": {"metrics": best, "epoch": best_epoch, "select": best_select, **(best_at or {})},
                "history": history,
                "schedule": schedule.state_dict() if hasattr(schedule, "state_dict") else None,
            }, state_path)
        acc.wait_for_everyone()

    if completed and keep_best:
        if best_path is not None and best_path.is_file():
            best_sd = torch.load(best_path, map_location="cpu", weights_only=True)
        else:
            best_sd = best_state_mem
        if best_sd is not None:
            _unwrap(model).load_state_dict(best_sd)
    acc.free_memory()  # drop Accelerate's references to this run's model/optimizer (multi-seed runs)
    return FitResult(best_metrics=best or {}, best_epoch=best_epoch, history=history, completed=completed,
                     resumed_from=resumed_from, best_at=(best_at or {}).get("at"), best_select=best_select)


def _select_text(info: dict) -> str:
    sel = info.get("select")
    return f"  select acc {sel['accuracy']:.4f}" if sel else ""


def clear_state(state_dir: str | os.PathLike) -> None:
    """Remove the resumable state files of a finished run."""
    for name in (STATE_FILE, BEST_FILE):
        p = Path(state_dir) / name
        if p.is_file():
            p.unlink()
