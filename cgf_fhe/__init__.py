"""cgf-fhe: privacy-preserving BERT inference under CKKS.

Stages: ``training`` (teacher + CGF student), ``export`` (polynomial ONNX, verifier, depth report),
``simulate`` (plain / emulated / TenSEAL CKKS). Core: :mod:`softmax`, :mod:`poly`, :mod:`surgery`,
:mod:`fhe_ops` (the one table of FHE op semantics), :mod:`data`, :mod:`cli`.
"""
from . import softmax as _softmax  # registers the "cgf" / "cgf_exact" attention implementations

__version__ = "0.1.0"
