"""Fault injection: SIGKILL a small smoke pipeline at random points, check that no file under a final name is ever
partial, rerun it, and check that it ends with the same outputs as an uninterrupted run."""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cgf_fhe.io import LOCK_NAME, TMP_PREFIX

REPO = Path(__file__).resolve().parents[1]
SEEDS = (1, 2, 3)

CONFIG = """\
max_length: 32
levels: [7]
teacher: {epochs: 1, max_train_samples: 64, max_eval_samples: 32}
student: {epochs: 1, max_train_samples: 64, max_eval_samples: 32}
cover: {max_train_samples: 64, max_eval_samples: 32}
export: {verify: 8}
emulate: {limit: 16}
"""


def _start(config, run, mrpc_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "cgf_fhe", "pipeline", "--config", str(config), "--data-dir",
                             str(mrpc_dir), "-o", str(run)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _finish(config, run, mrpc_dir):
    p = _start(config, run, mrpc_dir)
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]


def _check_complete(path: Path) -> None:
    """The file under a final name must be whole: parseable in its format."""
    suffix = path.suffix
    if suffix == ".json":
        json.loads(path.read_text())
    elif suffix == ".yaml":
        import yaml

        yaml.safe_load(path.read_text())
    elif suffix == ".onnx":
        import onnx

        onnx.checker.check_model(onnx.load(str(path)))
    elif suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            for k in f.keys():
                f.get_tensor(k)
    elif suffix == ".png":
        assert path.read_bytes().endswith(b"IEND\xaeB`\x82"), "truncated PNG"
    elif suffix in (".md", ".txt"):
        assert path.stat().st_size > 0, "empty"


def _final_files(run: Path):
    for f in sorted(run.rglob("*")):
        rel = f.relative_to(run)
        if not f.is_file() or "train_state" in rel.parts or f.name == LOCK_NAME:
            continue
        if f.name.startswith(TMP_PREFIX) or f.name.endswith(".tmp"):
            continue  # temporary names: a SIGKILL may leave them, they are never read as results
        yield f


def _fingerprint(run: Path) -> dict:
    """What an uninterrupted and a resumed run must agree on: the weights, the graph's content and every metric."""
    out = {}
    for ck in ("teacher", "student", "student-cover"):
        out[f"{ck}/model.safetensors"] = hashlib.sha256((run / ck / "model.safetensors").read_bytes()).hexdigest()
        out[f"{ck}/dev"] = json.loads((run / ck / "cgf_fhe.json").read_text())["dev"]
    import onnx

    g = onnx.load(str(run / "student.onnx")).graph
    out["onnx/initializers"] = hashlib.sha256(b"".join(t.raw_data for t in g.initializer)).hexdigest()
    out["onnx/nodes"] = len(g.node)
    sim = json.loads((run / "emulate-L7" / "simulation.json").read_text())
    out["emulate"] = {k: sim[k] for k in ("accuracy", "f1", "agreement", "max_logit_error", "logits", "level_budget")}
    rep = json.loads((run / "report-L7" / "report.json").read_text())
    out["report"] = {k: rep.get(k) for k in ("total_depth", "bootstraps_total", "level_budget")}
    summ = json.loads((run / "summary.json").read_text())
    out["summary"] = {k: summ[k] for k in ("teacher", "student", "levels", "reports")}
    return out


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun_gives_the_uninterrupted_outputs(tmp_path, mrpc_dir):
    config = tmp_path / "small.yaml"
    config.write_text(CONFIG)
    t0 = time.perf_counter()
    _finish(config, tmp_path / "base", mrpc_dir)
    full = time.perf_counter() - t0
    want = _fingerprint(tmp_path / "base")
    for f in _final_files(tmp_path / "base"):
        _check_complete(f)
    kills = []
    for seed in SEEDS:
        rng = random.Random(seed)
        run = tmp_path / f"run{seed}"
        for _ in range(2 if seed == SEEDS[0] else 1):  # the first seed also kills the resumed run once
            p = _start(config, run, mrpc_dir)
            at = rng.uniform(0.1, 0.9) * full
            try:
                p.wait(timeout=at)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
                kills.append((seed, round(at, 1)))
            p.stderr.close()
            for f in _final_files(run):
                try:
                    _check_complete(f)
                except Exception as exc:  # noqa: BLE001
                    pytest.fail(f"seed {seed}, killed at {at:.1f}s: {f.relative_to(run)} is partial ({exc!r})")
        _finish(config, run, mrpc_dir)
        got = _fingerprint(run)
        for key in want:
            assert got[key] == want[key], f"seed {seed}: {key} differs after kill + rerun"
    assert len(kills) >= len(SEEDS), f"too few kills landed inside a run: {kills}"
