"""The client hands its Galois keys over to the server: one copy of the run's largest object, not two."""
import json
import subprocess
import sys

import numpy as np
import pytest

from cgf_fhe.simulate import CKKSParams
from cgf_fhe.simulate.backends.base import SimulationError
from cgf_fhe.simulate.backends.seal_packed import SealClient, SealEngine

SMALL = CKKSParams(8192, (60, 40, 40, 60), 40)

_SCRIPT = r"""
import gc, json, sys
from cgf_fhe.simulate import CKKSParams
from cgf_fhe.simulate.backends.seal_packed import SealClient, SealEngine
from cgf_fhe.simulate.packing import galois_key_bytes

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

P = CKKSParams(8192, (60, 40, 40, 60), 40)
steps = list(range(1, 81))
client = SealClient(P, steps)
gc.collect()
r0 = rss()
blobs = client.hand_over_public() if sys.argv[1] == "hand" else client.public_blobs()
engine = SealEngine(P, client, blobs)
del blobs
gc.collect()
print(json.dumps({"growth": rss() - r0, "keys": galois_key_bytes(8192, 3) * len(steps)}))
"""


def _growth(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=300,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_handing_the_keys_over_keeps_one_copy_in_memory():
    kept, handed = _growth("keep"), _growth("hand")
    # keeping the client's copy: the server's keys are a second copy (~126 MB of keys here)
    assert kept["growth"] > 0.7 * kept["keys"]
    # handed over: the server's copy reuses the client's freed buffers from SEAL's pool
    assert handed["growth"] < 0.3 * handed["keys"]


def test_handed_over_keys_still_rotate_and_the_client_refuses_a_second_server():
    client = SealClient(SMALL, steps=[1, 5])
    server = SealEngine(SMALL, client)  # the default: hand over
    assert client.gk is None and client.steps == [1, 5]
    x = np.random.default_rng(3).normal(size=SMALL.slots)
    np.testing.assert_allclose(server.decrypt(server.rotate(server.encrypt(x), 5)), np.roll(x, -5), atol=1e-6)
    with pytest.raises(SimulationError, match="handed over to a server"):
        client.public_blobs()
