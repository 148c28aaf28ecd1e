"""``cgf-fhe simulate --backend seal`` on a tiny exported student, as the seal tests run it: N=8192, chain
[60, 40, 40, 60] (2 levels), at most 6 tokens, no progress bars."""
import json

from cgf_fhe.cli import main


def seal_cli_args(model, mrpc_dir, out, limit: int) -> list[str]:
    """The argument list (for a rerun with the same arguments, or extra flags appended)."""
    return ["simulate", str(model), "--backend", "seal", "--no-progress", "--data-dir", str(mrpc_dir),
            "--limit", str(limit), "--max-length", "6", "--poly-modulus", "8192", "--coeff-bits", "60,40,40,60",
            "-o", str(out)]


def run_seal_cli(model, mrpc_dir, out, *, limit: int, max_logit_error: float, extra=()) -> dict:
    """Run it (exit code 0), check all ``limit`` examples ran, agree with plain and have a logit error in
    ``(0, max_logit_error)``; return simulation.json."""
    assert main(seal_cli_args(model, mrpc_dir, out, limit) + list(extra)) == 0
    s = json.loads((out / "simulation.json").read_text())
    assert s["n_examples"] == limit and s["agreement"] == 1.0, (s["n_examples"], s["agreement"])
    assert 0 < s["max_logit_error"] < max_logit_error, s["max_logit_error"]
    return s
