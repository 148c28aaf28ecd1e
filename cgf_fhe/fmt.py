"""Human-readable numbers shared by the reports and the results page."""
from __future__ import annotations


def fmt_seconds(v: float | None, day_unit: str = "d", minutes_from: float = 60) -> str:
    """Seconds as "12.3 s" / "4.5 min" / "1.2 h" / "3.4 d" (``None`` -> "n/a"); ``minutes_from``: the
    threshold where minutes start (the results page keeps up to 2 min in seconds)."""
    if v is None:
        return "n/a"
    if v >= 86400:
        return f"{v / 86400:.1f} {day_unit}"
    if v >= 3600:
        return f"{v / 3600:.1f} h"
    if v >= minutes_from:
        return f"{v / 60:.1f} min"
    if v >= 1:
        return f"{v:.1f} s"
    return f"{v:.3g} s"


def fmt_best_point(settings: dict) -> str:
    """Where a run's best checkpoint was: its epoch ('3'), or its fractional position for a mid-epoch
    evaluation point of ``--evals-per-epoch`` ('1.5 (mid-epoch)' = half-way through epoch 2)."""
    at = settings.get("best_at")
    if at is not None and not float(at).is_integer():
        return f"{float(at):g} (mid-epoch)"
    return str(settings.get("best_epoch", "n/a"))
