"""cgf-fhe: privacy-preserving BERT inference under CKKS.

Stages: ``training`` (teacher + CGF student), ``export`` (polynomial ONNX, verifier, depth report),
``simulate`` (plain / emulated / TenSEAL CKKS). Core: :mod:`softmax`, :mod:`poly`, :mod:`surgery`,
:mod:`fhe_ops` (the one table of FHE op semantics), :mod:`data`, :mod:`cli`.
"""
__version__ = "0.1.0"

# The "cgf" / "cgf_exact" attention implementations are registered when cgf_fhe.softmax is imported, which
# cgf_fhe.models (every model load and build) does; importing the package itself stays light (no torch), so
# `cgf-fhe --help` starts in well under a second.
