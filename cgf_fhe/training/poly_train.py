"""Training-time aids for polynomial (``--poly all``) students, as a schedule for :func:`engine.fit`.

* **guard** (:func:`cgf_fhe.surgery.set_guard`): while training, every polynomial clamps its input into its
  interval, so one out-of-range activation cannot blow up (a polynomial explodes outside its interval). The
  encrypted evaluation has no clamp, so the guard is switched OFF for every dev evaluation.
* **frozen-LayerNorm blend** (:func:`cgf_fhe.surgery.set_frozen_blend`): ``blend`` goes linearly, per
  optimizer step, from 0 (exact LayerNorm) to 1 (frozen, the exported form) over the first
  ``blend_epochs`` epochs: ``blend(s) = min(1, s / ceil(blend_epochs * steps_per_epoch))`` for the 0-based
  global step ``s``. It is a function of the step count only, so a resumed run follows the same schedule.
  ``blend_epochs = 0`` is frozen from the first step.

Dev metrics are always measured in the exported form (guard off, blend 1). An epoch may become the best
checkpoint only if its last training step already ran at blend 1 (``eligible`` in the history); the
training form's dev metrics (guard on, the current blend) are recorded next to them as
``dev_training_form``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager


class PolyTraining:
    """Guard + blend schedule for :func:`cgf_fhe.training.engine.fit` (``schedule=``).

    ``frozen``: the student has frozen LayerNorms (the blend applies); ``blend_epochs``: length of the
    ramp in epochs (may be fractional)."""

    def __init__(self, guard: bool = True, blend_epochs: float = 0.0, frozen: bool = False):
        if blend_epochs < 0:
            raise ValueError(f"blend_epochs must be >= 0, got {blend_epochs}")
        self.guard = bool(guard)
        self.blend_epochs = float(blend_epochs) if frozen else 0.0
        self.frozen = bool(frozen)
        self.blend = 1.0  # the blend of the last training step

    # --------------------------------------------------------------- schedule
    def ramp_steps(self, steps_per_epoch: int) -> int:
        return math.ceil(self.blend_epochs * steps_per_epoch) if self.frozen else 0

    def blend_at(self, step: int, steps_per_epoch: int) -> float:
        n = self.ramp_steps(steps_per_epoch)
        return 1.0 if n <= 0 or step >= n else step / n

    def to_dict(self) -> dict:
        return {"guard": self.guard, "blend_epochs": self.blend_epochs if self.frozen else None}

    # --------------------------------------------------------------- hooks called by fit
    def on_step(self, model, step: int, steps_per_epoch: int) -> None:
        """Before training step ``step`` (0-based, counted over all epochs)."""
        from .. import surgery

        self.blend = self.blend_at(step, steps_per_epoch)
        if self.frozen:
            surgery.set_frozen_blend(model, self.blend)
        surgery.set_guard(model, self.guard)

    @contextmanager
    def exported_form(self, model):
        """Guard off, blend 1 (what is exported and what the encrypted evaluation computes); restores the
        training form afterwards."""
        from .. import surgery

        surgery.set_guard(model, False)
        surgery.set_frozen_blend(model, 1.0)
        try:
            yield model
        finally:
            self._training_form(model)

    def _training_form(self, model) -> None:
        from .. import surgery

        surgery.set_guard(model, self.guard)
        if self.frozen:
            surgery.set_frozen_blend(model, self.blend)

    def epoch_info(self, model, evaluate) -> dict:
        """After an epoch (``evaluate()`` scores the model as it is): blend, eligibility, training-form dev."""
        info = {"blend": self.blend, "guard": self.guard, "eligible": self.blend >= 1.0}
        if self.guard or self.blend < 1.0:
            self._training_form(model)
            info["dev_training_form"] = evaluate()
        return info

    def finish(self, model) -> None:
        """Leave the model in the exported form (guard off, blend 1)."""
        from .. import surgery

        surgery.set_guard(model, False)
        surgery.set_frozen_blend(model, 1.0)
        self.blend = 1.0
