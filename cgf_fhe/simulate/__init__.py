"""simulate stage: run an exported server graph under ``plain`` / ``emulate`` / ``tenseal`` CKKS.

* :class:`FHEModel` -- Python API (``predict(emb, mask, fhe="plain"|"emulate"|"tenseal")``, ``simulate``);
* :class:`Interpreter` -- the one ONNX interpreter (reads :mod:`cgf_fhe.fhe_ops`);
* :func:`make_backend` -- the backends; :class:`CKKSParams` -- parameters and the security check;
* ``cgf-fhe simulate`` -- :mod:`cgf_fhe.simulate.cli`.
"""
from .api import FHEModel
from .backends import BACKENDS, make_backend
from .backends.base import (BootstrapRangeError, LevelError, ModulusOverflowError, SimulationError)
from .interpreter import Interpreter, RunResult
from .params import CKKSParams, InsecureParamsError, ParamsError

__all__ = ["FHEModel", "Interpreter", "RunResult", "make_backend", "BACKENDS", "CKKSParams", "ParamsError",
           "InsecureParamsError", "SimulationError", "LevelError", "ModulusOverflowError", "BootstrapRangeError"]
