"""simulate stage: run an exported server graph under ``plain`` / ``emulate`` / ``tenseal`` CKKS.

* :class:`FHEModel` -- Python API (``predict(emb, mask, fhe="plain"|"emulate"|"tenseal")``, ``simulate``);
* :class:`Interpreter` -- the one ONNX interpreter (reads :mod:`cgf_fhe.fhe_ops`);
* :func:`make_backend` -- the backends; :class:`CKKSParams` -- parameters and the security check;
* ``cgf-fhe simulate`` -- :mod:`cgf_fhe.simulate.cli`.
"""
import importlib

# imported on first use (PEP 562), so `cgf-fhe --help` does not load onnx/numpy through this package
_LAZY = {"FHEModel": ".api", "BACKENDS": ".backends", "make_backend": ".backends", "BootstrapRangeError": ".backends.base",
         "LevelError": ".backends.base", "ModulusOverflowError": ".backends.base", "SimulationError": ".backends.base",
         "Interpreter": ".interpreter", "RunResult": ".interpreter", "CKKSParams": ".params",
         "InsecureParamsError": ".params", "ParamsError": ".params"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FHEModel", "Interpreter", "RunResult", "make_backend", "BACKENDS", "CKKSParams", "ParamsError",
           "InsecureParamsError", "SimulationError", "LevelError", "ModulusOverflowError", "BootstrapRangeError"]
