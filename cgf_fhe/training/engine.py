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
from contextlib import nullcontext
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


class Step:
    """A per-batch training step: ``step(model, batch) -> (loss, {name: float})``; ``prepare(accelerator)`` runs
    once after Accelerate has placed the model (move frozen helpers such as a teacher to its device)."""

    name = "step"

    def prepare(self, accelerator) -> None:
        pass

    def __call__(self, model, batch):
        raise NotImplementedError


class CEStep(Step):
    """Cross-entropy fine-tuning on the labels."""

    name = "ce"

    def __call__(self, model, batch):
        out = model(**model_inputs(batch))
        loss = F.cross_entropy(out.logits.float(), batch["labels"])
        return loss, {}


class KDStep(Step):
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
              **schedule.divergence_info(), "history": history}
    path = state_dir / DIVERGED_FILE if state_dir is not None else None
    if path is not None and write:  # atomic: a reader (record_run.py) sees no file or the whole record
        from ..io import write_text

        write_text(path, json.dumps(record, indent=2, default=str) + "\n")
    where = (f"step {step} (epoch {record['at']:g} of {epochs}"
             + (f", frozen-LayerNorm blend {record['blend']:.3g}" if record["blend"] is not None else "") + ")")
    return TrainingDiverged(f"[{desc}] training diverged: loss {loss} at {where}; parts "
                            + ", ".join(f"{k} {v}" for k, v in record["parts"].items())
                            + (f"; recorded in {path}" if path is not None else ""), record)


def _atomic_save(obj, path: Path) -> None:
    from ..io import atomic_write  # temp file removed on any failure; a full disk is "disk full: PATH"

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


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


class Schedule:
    """What a training run does besides the optimizer steps: the explicit interface of ``fit(schedule=...)``.

    The base class does nothing (a plain fine-tune); :class:`cgf_fhe.training.poly_train.StudentSchedule` is the
    distilled student's (guard, blends, refit, epoch cover). Called by :class:`Trainer`, in this order:

    * ``on_step(model, step, steps_per_epoch)`` before every training step (``step`` = 0-based global step, a
      function of epoch and batch only, so a resumed run follows the same schedule);
    * at every evaluation point (epoch ends and the mid-epoch points of ``recipe.evals_per_epoch``):
      ``on_epoch_end(model)`` after the training steps, then dev is scored inside ``exported_form(model)``
      (a context manager), then ``epoch_info(model, evaluate, diagnostics)`` returns a dict merged into the
      point's history record (``diagnostics`` is False at mid-epoch points: skip extra passes; ``"eligible":
      False`` keeps the point from being chosen as the best), and ``on_best(model)`` when the point becomes
      the best;
    * ``state_dict()`` is saved with the training state (strings / tensors only) and
      ``load_state_dict(model, state)`` restores it on resume, after the model weights;
    * ``divergence_info()``: the blends reported when the loss becomes non-finite."""

    def on_step(self, model, step: int, steps_per_epoch: int) -> None:
        pass

    def on_epoch_end(self, model) -> None:
        pass

    def exported_form(self, model):
        return nullcontext(model)

    def epoch_info(self, model, evaluate, diagnostics: bool = True) -> dict:
        return {}

    def on_best(self, model) -> None:
        pass

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, model, state: dict) -> None:
        pass

    def divergence_info(self) -> dict:
        return {"blend": None, "softmax_blend": None}


@dataclass
class _Best:
    """The best evaluation point so far (strictly better accuracy wins)."""
    metrics: dict | None = None  # its dev metrics
    epoch: int = 0
    at: dict | None = None  # {"at": epochs trained (fractional), "step": global step}
    select: dict | None = None  # its selection-set metrics (fit with a select_dataset)
    weights: dict | None = None  # in memory when there is no state directory

    def to_state(self) -> dict:
        return {"metrics": self.metrics, "epoch": self.epoch, "select": self.select, **(self.at or {})}

    @classmethod
    def from_state(cls, st: dict) -> "_Best":
        at = {"at": float(st["at"]), "step": int(st["step"])} if "at" in st else None
        return cls(metrics=st["metrics"], epoch=int(st["epoch"]), at=at, select=st.get("select"))


@dataclass
class _EpochTally:
    """Running sums of one epoch's training steps."""
    total: float = 0.0
    count: int = 0
    parts: dict = field(default_factory=dict)
    mids: list = field(default_factory=list)  # this epoch's mid-epoch evaluation records
    mid_seconds: float = 0.0  # time spent in them (not training)

    def add(self, loss: float, parts: dict) -> None:
        self.total += loss
        self.count += 1
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + v

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)


class Trainer:
    """One training run (see :func:`fit` for the arguments): set up, resume, epochs of steps with evaluation
    points, best-point selection, resumable state."""

    def __init__(self, model, step, train_dataset, eval_dataset, collate_fn, recipe: Recipe, seed: int = 42,
                 state_dir=None, device: str | None = None, mixed_precision: str = "auto", progress: bool = True,
                 desc: str = "train", log: Callable[[str], None] | None = None, run_info: dict | None = None,
                 schedule: Schedule | None = None, select_dataset=None):
        if recipe.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a cgf_fhe.training.engine.Schedule, got {type(schedule).__name__}")
        self.recipe, self.seed, self.desc, self.progress = recipe, int(seed), desc, progress
        self.step = step
        self.schedule = schedule if schedule is not None else Schedule()
        self.acc = get_accelerator(device, resolve_precision(mixed_precision, device, has_polynomials(model)))
        self.main = self.acc.is_main_process
        self.log = log or (lambda msg: tqdm.write(msg) if self.main else None)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        if self.state_dir is not None and self.main:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.state_dir / STATE_FILE if self.state_dir is not None else None
        self.best_path = self.state_dir / BEST_FILE if self.state_dir is not None else None
        set_seed(seed)
        self._loaders(train_dataset, eval_dataset, select_dataset, collate_fn)
        self._optimization(model)
        self.fingerprint = {
            "seed": int(seed), "epochs": int(recipe.epochs), "batch_size": int(recipe.batch_size),
            "lr": float(recipe.lr), "n_train": len(train_dataset), "num_processes": self.acc.num_processes,
            "step": getattr(step, "name", type(step).__name__), "run": run_info or {},
            "n_select": len(select_dataset) if select_dataset is not None else 0}
        self.start_epoch, self.history, self.resumed_from = 0, [], None
        self.best = _Best()
        self.steps_per_epoch = len(self.train_loader)
        self.eval_points = eval_steps(self.steps_per_epoch, getattr(recipe, "evals_per_epoch", 1))

    # ------------------------------------------------------------ set-up
    def _loaders(self, train_dataset, eval_dataset, select_dataset, collate_fn) -> None:
        from torch.utils.data import DataLoader, DistributedSampler

        acc, recipe = self.acc, self.recipe
        self.sampler = DistributedSampler(train_dataset, num_replicas=acc.num_processes, rank=acc.process_index,
                                          shuffle=True, seed=self.seed, drop_last=False)
        self.train_loader = DataLoader(train_dataset, batch_size=recipe.batch_size, sampler=self.sampler,
                                       collate_fn=collate_fn)
        self.eval_loader = DataLoader(eval_dataset, batch_size=recipe.eval_batch_size, shuffle=False,
                                      collate_fn=collate_fn)
        self.select_loader = None if select_dataset is None else DataLoader(
            select_dataset, batch_size=recipe.eval_batch_size, shuffle=False, collate_fn=collate_fn)

    def _optimization(self, model) -> None:
        from transformers import get_linear_schedule_with_warmup

        acc, recipe = self.acc, self.recipe
        model.to(acc.device)
        named = trainable_parameters(model, recipe.freeze_embeddings)
        if not named:
            raise ValueError("no trainable parameters")
        optimizer = build_optimizer(named, recipe, getattr(getattr(model, "config", None), "num_hidden_layers", None))
        total_steps = len(self.train_loader) * recipe.epochs
        self.scheduler = get_linear_schedule_with_warmup(optimizer, int(recipe.warmup_ratio * total_steps),
                                                         total_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        if isinstance(self.step, Step):
            self.step.prepare(acc)
        self.params = [p for _, p in named]

    @property
    def net(self):
        """The model without its data-parallel wrapper."""
        return _unwrap(self.model)

    # ------------------------------------------------------------ resume / state
    def resume(self) -> None:
        if self.state_path is None:
            raise ResumeError("resume needs a state directory")
        if not self.state_path.is_file():
            self.log(f"[{self.desc}] --resume: no state at {self.state_path}, starting from scratch")
            return
        st = load_state(self.state_path)
        if st.get("format") != STATE_FORMAT:
            raise ResumeError(f"{self.state_path}: unknown state format {st.get('format')!r}")
        saved_fp = st["fingerprint"]  # keys a state file does not have (older versions) are not compared
        diff = {k: (saved_fp[k], v) for k, v in self.fingerprint.items()
                if k in saved_fp and _norm(saved_fp[k]) != _norm(v)}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ResumeError(f"{self.state_path} was written by a different run ({detail}); "
                              "use another output folder or drop --resume")
        self.net.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        if self.acc.scaler is not None and st.get("scaler"):
            self.acc.scaler.load_state_dict(st["scaler"])
        set_rng_state(st["rng"])
        self.schedule.load_state_dict(self.net, st.get("schedule") or {})
        self.start_epoch, self.history = int(st["epoch"]), list(st["history"])
        self.best = _Best.from_state(st["best"])
        self.resumed_from = self.start_epoch
        best = self.best.metrics
        self.log(f"[{self.desc}] resuming after epoch {self.start_epoch}/{self.recipe.epochs} " + (
            f"(best dev accuracy {best['accuracy']:.4f} at epoch {self.best.epoch})" if best
            else "(no eligible epoch yet)"))

    def _save_state(self, epoch: int) -> None:
        if self.state_path is None or not self.main:
            return
        _atomic_save({
            "format": STATE_FORMAT, "epoch": epoch, "fingerprint": self.fingerprint,
            "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
            "rng": get_rng_state(), "best": self.best.to_state(), "history": self.history,
            "schedule": self.schedule.state_dict(),
        }, self.state_path)

    # ------------------------------------------------------------ evaluation points
    def _evaluate(self, loader=None):
        return evaluate_model(self.net, loader or self.eval_loader, self.acc.device, autocast=self.acc.autocast)

    def _score(self, mid: bool = False):
        """Dev metrics of the model as it is now (in the schedule's exported form) + the schedule's info.
        ``mid``: a mid-epoch point, where the schedule skips its diagnostic passes."""
        info = {}
        self.schedule.on_epoch_end(self.net)
        with self.schedule.exported_form(self.net):
            dev = self._evaluate()
            if self.select_loader is not None:
                info["select"] = self._evaluate(self.select_loader)
        info.update(self.schedule.epoch_info(self.net, self._evaluate, diagnostics=not mid))
        return dev, info

    def _consider(self, dev, info, epoch_no, at, step_no) -> bool:
        """Best-point selection over every evaluation point (strictly better accuracy wins), on the selection
        set if there is one, else on dev."""
        b = self.best
        now = info.get("select", dev)
        held = b.select if self.select_loader is not None else b.metrics
        if not (info.get("eligible", True) and (b.metrics is None or held is None
                                                or now["accuracy"] > held["accuracy"])):
            return False
        b.metrics, b.epoch, b.at, b.select = dev, epoch_no, {"at": at, "step": step_no}, info.get("select")
        self.schedule.on_best(self.net)
        sd = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        if self.best_path is not None:
            if self.main:
                _atomic_save(sd, self.best_path)
        else:
            b.weights = sd
        return True

    def _mid_point(self, epoch: int, tally: _EpochTally, global_step: int) -> None:
        """A mid-epoch evaluation point: RNG-neutral (the eval loader draws a seed from the global generator),
        so the training trajectory is the same as with one evaluation per epoch."""
        tm = time.perf_counter()
        rng = get_rng_state()
        dev, info = self._score(mid=True)
        set_rng_state(rng)
        self.model.train()
        at = round(epoch + tally.count / self.steps_per_epoch, 4)
        improved = self._consider(dev, info, epoch + 1, at, global_step)
        tally.mids.append({"at": at, "step": global_step, "train_loss": tally.total / tally.count, "dev": dev,
                           "eval_seconds": time.perf_counter() - tm, **info})
        tally.mid_seconds += time.perf_counter() - tm
        self.log(f"[{self.desc}] epoch {at:g}/{self.recipe.epochs} (step {global_step}): dev acc "
                 f"{dev['accuracy']:.4f} f1 {dev['f1']:.4f}" + _select_text(info) + ("  *best*" if improved else "")
                 + ("" if info.get("eligible", True) else "  (not eligible: blend < 1)"))

    # ------------------------------------------------------------ training
    def _train_step(self, batch, epoch: int, tally: _EpochTally, global_step: int) -> None:
        acc = self.acc
        with acc.autocast():
            loss, parts = self.step(self.model, batch)
        if not torch.isfinite(loss.detach()):
            mids = [{"epoch": epoch + 1, "mid_evals": tally.mids}] if tally.mids else []
            raise _diverged(self.desc, float(loss.detach()), parts, epoch=epoch + 1, step=global_step,
                            at=epoch + (tally.count + 1) / self.steps_per_epoch, epochs=self.recipe.epochs,
                            mean_before=tally.total / tally.count if tally.count else None,
                            schedule=self.schedule, history=self.history + mids, state_dir=self.state_dir,
                            write=self.main)
        acc.backward(loss)
        if self.recipe.max_grad_norm:
            acc.clip_grad_norm_(self.params, self.recipe.max_grad_norm)
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tally.add(float(loss.detach()), parts)

    def _train_epoch(self, epoch: int, global_step: int) -> tuple[_EpochTally, int, float]:
        """One epoch's training steps and mid-epoch points: (tally, global step after it, training seconds)."""
        self.sampler.set_epoch(epoch)
        self.model.train()
        t0 = time.perf_counter()
        tally = _EpochTally()
        bar = tqdm(self.train_loader, desc=f"{self.desc} epoch {epoch + 1}/{self.recipe.epochs}",
                   disable=not (self.progress and self.main), leave=False, dynamic_ncols=True)
        for batch in bar:
            batch = {k: v.to(self.acc.device) for k, v in batch.items()}
            self.schedule.on_step(self.net, global_step, self.steps_per_epoch)
            global_step += 1
            self._train_step(batch, epoch, tally, global_step)
            bar.set_postfix(loss=f"{tally.mean:.4f}", **{k: f"{v / tally.count:.4f}" for k, v in tally.parts.items()})
            if tally.count in self.eval_points and tally.count < self.steps_per_epoch:
                self._mid_point(epoch, tally, global_step)
        bar.close()
        return tally, global_step, time.perf_counter() - t0 - tally.mid_seconds

    def _end_epoch(self, epoch: int, tally: _EpochTally, global_step: int, train_seconds: float) -> None:
        t1 = time.perf_counter()
        dev, info = self._score()
        eval_seconds = time.perf_counter() - t1
        record = {"epoch": epoch + 1, "train_loss": tally.mean,
                  **{f"train_{k}": v / max(tally.count, 1) for k, v in tally.parts.items()},
                  "dev": dev, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                  "lr": float(self.scheduler.get_last_lr()[0]), **info}
        if tally.mids:
            record["mid_evals"] = tally.mids
        self.history.append(record)
        improved = self._consider(dev, info, epoch + 1, float(epoch + 1), global_step)
        self.log(_epoch_line(self.desc, record, self.recipe.epochs, improved))
        self._save_state(epoch + 1)
        self.acc.wait_for_everyone()

    def run(self, stop_after: int | None = None, keep_best: bool = True) -> FitResult:
        completed = True
        global_step = self.start_epoch * self.steps_per_epoch
        for epoch in range(self.start_epoch, self.recipe.epochs):
            if stop_after is not None and epoch >= stop_after:
                completed = False
                break
            tally, global_step, train_seconds = self._train_epoch(epoch, global_step)
            self._end_epoch(epoch, tally, global_step, train_seconds)
        if completed and keep_best:
            self._load_best()
        self.acc.free_memory()  # drop Accelerate's references to this run's model/optimizer (multi-seed runs)
        b = self.best
        return FitResult(best_metrics=b.metrics or {}, best_epoch=b.epoch, history=self.history,
                         completed=completed, resumed_from=self.resumed_from, best_at=(b.at or {}).get("at"),
                         best_select=b.select)

    def _load_best(self) -> None:
        if self.best_path is not None and self.best_path.is_file():
            best_sd = torch.load(self.best_path, map_location="cpu", weights_only=True)
        else:
            best_sd = self.best.weights
        if best_sd is not None:
            self.net.load_state_dict(best_sd)


def _epoch_line(desc: str, record: dict, epochs: int, improved: bool) -> str:
    dev, info = record["dev"], record
    return (f"[{desc}] epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.4f}  dev acc "
            f"{dev['accuracy']:.4f} f1 {dev['f1']:.4f}{_select_text(info)}  ({record['train_seconds']:.1f}s train, "
            f"{record['eval_seconds']:.1f}s eval)"
            + (f"  [training form: dev acc {info['dev_training_form']['accuracy']:.4f}, blend {info['blend']:.3g}"
               + (f", softmax blend {info['softmax_blend']:.3g}" if "softmax_blend" in info else "") + "]"
               if "dev_training_form" in info else "")
            + ("  *best*" if improved else "") + ("" if info.get("eligible", True) else "  (not eligible: blend < 1)"))


def fit(model, step, train_dataset, eval_dataset, collate_fn, recipe: Recipe, seed: int = 42,
        state_dir: str | os.PathLike | None = None, resume: bool = False, device: str | None = None,
        mixed_precision: str = "auto", progress: bool = True, stop_after: int | None = None,
        desc: str = "train", log: Callable[[str], None] | None = None, keep_best: bool = True,
        run_info: dict | None = None, schedule: Schedule | None = None, select_dataset=None) -> FitResult:
    """Train ``model`` in place with ``step`` and leave the best-on-dev weights in it (a :class:`Trainer` run).

    ``step(model, batch) -> (loss, {name: float})``, a :class:`Step` (its ``prepare(accelerator)`` runs after
    Accelerate's set-up) or any callable. ``schedule``: a :class:`Schedule` (hooks around steps and evaluation
    points, see there). ``select_dataset`` (e.g. a part of the training set held out from training): choose
    the best point on its accuracy instead of dev's, so that the dev metrics reported for that point are not
    selected on dev; each point's record then has ``select`` next to ``dev``; ``best_metrics`` stays dev's.
    ``stop_after``: stop (as if interrupted) once this many epochs are done in total; continue with
    ``resume=True``. ``keep_best=False`` leaves the last epoch's weights instead of the best ones (the best
    metrics are still reported). ``run_info``: JSON-like description of the run stored in the state; ``resume``
    refuses a state whose description differs. Returns a :class:`FitResult`."""
    trainer = Trainer(model, step, train_dataset, eval_dataset, collate_fn, recipe, seed=seed, state_dir=state_dir,
                      device=device, mixed_precision=mixed_precision, progress=progress, desc=desc, log=log,
                      run_info=run_info, schedule=schedule, select_dataset=select_dataset)
    if resume:
        trainer.resume()
    return trainer.run(stop_after=stop_after, keep_best=keep_best)


def _select_text(info: dict) -> str:
    sel = info.get("select")
    return f"  select acc {sel['accuracy']:.4f}" if sel else ""


def clear_state(state_dir: str | os.PathLike) -> None:
    """Remove the resumable state files of a finished run."""
    for name in (STATE_FILE, BEST_FILE):
        p = Path(state_dir) / name
        if p.is_file():
            p.unlink()
