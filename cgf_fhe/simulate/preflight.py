"""Checks `simulate` runs before any data is loaded or encrypted: what is known from the graph and the CKKS
parameters alone must fail in a second, not after minutes of encryption."""
from __future__ import annotations

from ..errors import GraphError, UserError
from .params import HE_STANDARD_128


def preflight(onnx_model, cfg, params, onnx_path=None) -> None:
    """Raise a one-line error for a run that cannot succeed:

    * a graph that declares no encrypted input (not written by ``cgf-fhe export``): ``simulate`` has no
      ``--encrypted`` flag, so the only fix is re-exporting;
    * ``--insecure`` with ``--backend tenseal``: SEAL itself enforces the 128-bit table and refuses the context;
    * ``--refresh none`` with fewer levels than the graph's multiplicative depth (unless the emulator is told
      to go on with garbage, ``--on-exhausted garbage``).
    """
    from .. import fhe_ops

    name = onnx_path or "the ONNX file"
    if cfg.backend == "tenseal" and params.log_q > HE_STANDARD_128[params.poly_modulus]:
        ok = [n for n in sorted(HE_STANDARD_128) if HE_STANDARD_128[n] >= params.log_q]
        raise UserError(
            f"--insecure does not work with --backend tenseal: SEAL (under TenSEAL) refuses parameters below "
            f"128-bit security itself (N={params.poly_modulus} allows log Q <= {HE_STANDARD_128[params.poly_modulus]}, "
            f"this chain has {params.log_q}) and offers no switch to lower its check"
            + (f"; use --poly-modulus {ok[0]}" if ok else "; shorten the chain") + " or fewer --levels, or run the "
            "insecure parameters with --backend emulate")
    try:
        analysis = fhe_ops.analyze(onnx_model)
    except GraphError as exc:
        if "no encrypted input declared" in str(exc):
            raise GraphError(f"{name} declares no encrypted input (ONNX metadata cgf_fhe.encrypted_inputs): simulate "
                             "runs graphs written by `cgf-fhe export`; export the checkpoint again with it") from None
        raise
    fails = cfg.backend == "tenseal" or (cfg.backend == "emulate" and cfg.on_exhausted == "raise")
    if fails and cfg.refresh == "none" and analysis.total_depth > params.level_budget:
        raise UserError(f"--refresh none: the graph's multiplicative depth is {analysis.total_depth} but the "
                        f"parameters give {params.level_budget} levels; use --refresh plan, or at least "
                        f"--levels {analysis.total_depth}")
