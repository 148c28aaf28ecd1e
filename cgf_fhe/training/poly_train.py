"""The training schedule of a distilled student (:class:`StudentSchedule`, ``schedule=`` of :func:`engine.fit`):
the aids for polynomial (``--poly all``) students, and the softmax blend for any CGF student.

* **guard** (:func:`cgf_fhe.surgery.set_guard`): while training, every polynomial clamps its input into its
  interval, so one out-of-range activation cannot blow up (a polynomial explodes outside its interval). The
  encrypted evaluation has no clamp, so the guard is switched OFF for every dev evaluation.
* **frozen-LayerNorm blend** (:func:`cgf_fhe.surgery.set_frozen_blend`): ``blend`` goes linearly, per
  optimizer step, from 0 (exact LayerNorm) to 1 (frozen, the exported form) over the first
  ``blend_epochs`` epochs: ``blend(s) = min(1, s / ceil(blend_epochs * steps_per_epoch))`` for the 0-based
  global step ``s``. It is a function of the step count only, so a resumed run follows the same schedule.
  ``blend_epochs = 0`` is frozen from the first step.
* **refit at the end of the ramp** (opt-in ``refit=True``, frozen LayerNorm with ``blend_epochs > 0``): the
  intervals were calibrated on the exact-LayerNorm model; once the student runs frozen LayerNorms the
  activations downstream move far outside them (MiniLM: layer-1 exp argument [-100, 28] vs [-7, 7]), which the
  guard hides in training but which blows up the exported (unclamped) polynomials. At the first step with
  blend 1 the ranges are measured again on the training data (the training form: guard on, blend 1, so the
  recorded pre-clamp inputs come from a sane network) and the exp / GELU / tanh polynomials are refitted on
  them (same options; the frozen-LayerNorm constants are kept). The remaining steps train the refitted
  polynomials, i.e. what is exported. The refitted settings are part of the resumable state. Caveat: the
  new intervals can be much wider (more exp squarings -> more depth; less accurate GELU), and on a briefly
  trained MiniLM the frozen model's activations are simply too large (exp arguments up to ~30), so it is
  not the default.

* **epoch cover** (opt-in ``epoch_cover=True``): the out-of-interval counters run on every training forward
  (training form: guard on, so each op sees what a sane upstream gives it). At the end of every epoch, before
  the dev evaluation, every interval the epoch's inputs left is widened to cover them
  (:func:`cgf_fhe.surgery.tracked_ranges` + :func:`cgf_fhe.surgery.cover_ranges`, i.e. ``cgf-fhe cover``
  without its extra calibration pass). Without it the guard hides the drift: the exported (unclamped) form
  of a later epoch can blow up (NaN logits) although its training form is fine, so best-checkpoint
  selection sees a collapsed epoch. The polynomial settings of the best epoch are kept with its weights.
  With ``recipe.evals_per_epoch > 1`` the same cover runs before every mid-epoch evaluation point too, on
  the training inputs since the previous point.

* **softmax blend** (opt-in ``softmax_blend_epochs > 0``, any CGF student, polynomial or not): the attention
  weights are ``b * CGF + (1 - b) * exact softmax`` (:func:`cgf_fhe.softmax.set_cgf_blend`), ``b`` ramping
  linearly per step from 0 to 1 over the first ``softmax_blend_epochs`` epochs, so the student leaves the
  teacher's function gradually instead of in one jump (MiniLM with CGF swapped in scores 7-8 pp below its
  teacher before any training). Same step-count schedule and eligibility rule as the LayerNorm blend.

Dev metrics are always measured in the exported form (guard off, blend 1). An epoch may become the best
checkpoint only if its last training step already ran at blend 1 (``eligible`` in the history); the
training form's dev metrics (guard on, the current blend) are recorded next to them as
``dev_training_form`` (at epoch ends only, not at mid-epoch evaluation points).
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import replace

from ..softmax import set_cgf_blend
from .engine import Schedule


def _ramp(step: int, n: int) -> float:
    """Linear 0 -> 1 over the first ``n`` steps (step / n), then exactly 1; ``n <= 0``: 1 from the start."""
    return 1.0 if n <= 0 or step >= n else step / n


class StudentSchedule(Schedule):
    """Guard, blends, refit and epoch cover for :func:`cgf_fhe.training.engine.fit` (``schedule=``); a plain CGF
    student uses only the softmax blend (``guard=False``).

    ``frozen``: the student has frozen LayerNorms (the blend applies); ``blend_epochs``: length of the
    ramp in epochs (may be fractional)."""

    def __init__(self, guard: bool = True, blend_epochs: float = 0.0, frozen: bool = False, refit: bool = False,
                 epoch_cover: bool = False, softmax_blend_epochs: float = 0.0):
        if blend_epochs < 0 or softmax_blend_epochs < 0:
            raise ValueError(f"blend epochs must be >= 0, got {blend_epochs} (LayerNorm) / "
                             f"{softmax_blend_epochs} (softmax)")
        self.softmax_blend_epochs = float(softmax_blend_epochs)
        self.softmax_blend = 1.0  # the softmax blend of the last training step
        self.guard = bool(guard)
        self.blend_epochs = float(blend_epochs) if frozen else 0.0
        self.frozen = bool(frozen)
        self.refit = bool(refit) and self.frozen and self.blend_epochs > 0
        self.blend = 1.0  # the blend of the last training step
        self.refit_loader = None
        self.refit_kw: dict = {}
        self.refit_result: dict | None = None  # {"step", "ranges", "settings"} once refitted
        self.epoch_cover = bool(epoch_cover)
        self.covered: dict = {}  # what the last epoch's cover widened ({key: {old, new, measured, depth_*}})
        self.settings: dict | None = None  # the fhe settings after the last cover that changed something
        self.best_settings: dict | None = None  # the fhe settings of the best epoch (with epoch cover)
        self._reset_pending = False  # an evaluation point just covered: count the next training inputs afresh

    def attach(self, loader, device="cpu", max_batches: int | None = None, progress: bool = True) -> None:
        """The training data (unshuffled loader) the refit calibrates on."""
        self.refit_loader = loader
        self.refit_kw = {"device": str(device), "max_batches": max_batches, "progress": progress}

    # --------------------------------------------------------------- schedule
    def ramp_steps(self, steps_per_epoch: int) -> int:
        return math.ceil(self.blend_epochs * steps_per_epoch) if self.frozen else 0

    def blend_at(self, step: int, steps_per_epoch: int) -> float:
        return _ramp(step, self.ramp_steps(steps_per_epoch))

    def softmax_blend_at(self, step: int, steps_per_epoch: int) -> float:
        return _ramp(step, math.ceil(self.softmax_blend_epochs * steps_per_epoch))

    def to_dict(self) -> dict:
        d = {"guard": self.guard, "blend_epochs": self.blend_epochs if self.frozen else None, "refit": self.refit}
        if self.epoch_cover:  # only when on, so runs from before the option compare unchanged
            d["epoch_cover"] = True
        if self.softmax_blend_epochs:
            d["softmax_blend_epochs"] = self.softmax_blend_epochs
        return d

    # --------------------------------------------------------------- refit
    def refit_now(self, model, step: int) -> dict:
        """Re-measure the ranges in the training form and refit the exp / GELU / tanh polynomials."""
        from .. import surgery

        if self.refit_loader is None:
            raise RuntimeError("StudentSchedule.refit needs attach(loader) first")
        options = getattr(model, "cgf_fhe_options", None) or surgery.FheOptions(poly="all")
        kinds = tuple(k for k in options.kinds if k != "ln")
        self._training_form(model)
        ranges = surgery.calibrate(model, self.refit_loader, **self.refit_kw)
        settings = surgery.fhe_settings(model)
        new = surgery.build_modules(model, replace(options, kinds=kinds), ranges)
        settings["modules"].update({k: m.to_settings() for k, m in new.items()})
        surgery.apply_fhe_settings(model, settings)
        self._training_form(model)  # the rebuilt modules start with the guard off
        self.refit_result = {"step": int(step), "ranges": ranges, "settings": surgery.fhe_settings(model)}
        return self.refit_result

    def state_dict(self) -> dict:
        """Saved with the training state (strings only: loadable with ``weights_only=True``)."""
        def dump(obj):
            return json.dumps(obj) if obj is not None else ""

        return {"refit": dump(self.refit_result), "settings": dump(self.settings),
                "best_settings": dump(self.best_settings)}

    def load_state_dict(self, model, state: dict) -> None:
        """Resume: rebuild the refitted / covered polynomials (after the model's weights are loaded)."""
        from .. import surgery

        state = state or {}
        raw = state.get("refit") or ""
        if raw:
            self.refit_result = json.loads(raw)
            surgery.apply_fhe_settings(model, self.refit_result["settings"])
        if state.get("settings"):  # a later epoch cover supersedes the refit's settings
            self.settings = json.loads(state["settings"])
            surgery.apply_fhe_settings(model, self.settings)
        if state.get("best_settings"):
            self.best_settings = json.loads(state["best_settings"])
        self._training_form(model)

    # --------------------------------------------------------------- epoch cover
    def on_epoch_end(self, model) -> None:
        """After an epoch's last training step, before its dev evaluation: widen what the epoch's training
        inputs left (epoch cover), so the exported form scored next computes what training computed."""
        from .. import surgery

        self.covered = {}
        if not self.epoch_cover:
            return
        self.covered = surgery.cover_ranges(model, surgery.tracked_ranges(model))
        self._reset_pending = True
        if self.covered:
            self.settings = surgery.fhe_settings(model)
        self._training_form(model)  # rebuilt modules start with the guard off

    def on_best(self, model) -> None:
        """The epoch just scored is the new best: remember its polynomial settings with its weights."""
        from .. import surgery

        if self.epoch_cover:
            self.best_settings = surgery.fhe_settings(model)

    # --------------------------------------------------------------- hooks called by fit
    def on_step(self, model, step: int, steps_per_epoch: int) -> None:
        """Before training step ``step`` (0-based, counted over all epochs)."""
        from .. import surgery

        self.blend = self.blend_at(step, steps_per_epoch)
        self.softmax_blend = self.softmax_blend_at(step, steps_per_epoch)
        if self.epoch_cover and (step % steps_per_epoch == 0 or self._reset_pending):
            # the training inputs since the last evaluation point only (not the dev passes)
            surgery.reset_interval_counters(model)
            self._reset_pending = False
        if self.frozen:
            surgery.set_frozen_blend(model, self.blend)
        if self.softmax_blend_epochs:
            set_cgf_blend(model, self.softmax_blend)
        surgery.set_guard(model, self.guard)
        if self.refit and self.refit_result is None and self.blend >= 1.0:
            self.refit_now(model, step)

    @contextmanager
    def exported_form(self, model):
        """Guard off, blend 1 (what is exported and what the encrypted evaluation computes); restores the
        training form afterwards."""
        from .. import surgery

        surgery.set_guard(model, False)
        surgery.set_frozen_blend(model, 1.0)
        if self.softmax_blend_epochs:
            set_cgf_blend(model, 1.0)
        try:
            yield model
        finally:
            self._training_form(model)

    def _training_form(self, model) -> None:
        from .. import surgery

        surgery.set_guard(model, self.guard)
        if self.frozen:
            surgery.set_frozen_blend(model, self.blend)
        if self.softmax_blend_epochs:
            set_cgf_blend(model, self.softmax_blend)

    def epoch_info(self, model, evaluate, diagnostics: bool = True) -> dict:
        """After an epoch (``evaluate()`` scores the model as it is): blend, eligibility, training-form dev.

        ``diagnostics=False`` (mid-epoch evaluation points) skips the training-form dev pass: it only documents
        what the guard hid, never takes part in selection, and would double the cost of every point."""
        info = {"blend": self.blend, "guard": self.guard, "eligible": min(self.blend, self.softmax_blend) >= 1.0}
        if self.softmax_blend_epochs:
            info["softmax_blend"] = self.softmax_blend
        if self.refit:
            info["refitted"] = self.refit_result is not None
        if self.epoch_cover:
            info["covered"] = {k: {"old": v["old"], "new": v["new"], "measured": v["measured"]}
                               for k, v in self.covered.items()}
        if diagnostics and (self.guard or min(self.blend, self.softmax_blend) < 1.0):
            self._training_form(model)
            info["dev_training_form"] = evaluate()
        return info

    def divergence_info(self) -> dict:
        return {"blend": self.blend if self.frozen else None, "softmax_blend": self.softmax_blend}

    def finish(self, model) -> None:
        """Leave the model in the exported form (guard off, blend 1) with the best epoch's polynomial settings
        (epoch cover; call it after the best epoch's weights are loaded)."""
        from .. import surgery

        if self.best_settings is not None:
            surgery.apply_fhe_settings(model, self.best_settings)
        surgery.set_guard(model, False)
        surgery.set_frozen_blend(model, 1.0)
        if self.softmax_blend_epochs:
            set_cgf_blend(model, 1.0)
        self.blend = self.softmax_blend = 1.0
