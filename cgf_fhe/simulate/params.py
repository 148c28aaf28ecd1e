"""CKKS parameters for the simulator: re-exported from :mod:`cgf_fhe.ckks`, the one CKKS module."""
from ..ckks import (DEFAULT_SCALE_BITS, EDGE_BITS, HE_STANDARD_128, MAX_PRIME_BITS, CKKSParams,  # noqa: F401
                    InsecureParamsError, ParamsError, chain_for, max_secure_levels, parse_bits, ring_for, seal_primes)
