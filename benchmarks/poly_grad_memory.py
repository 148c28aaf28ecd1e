"""Peak memory and time of polynomial-student training steps: autograd through the polynomial schedules
(every intermediate product recorded) vs the derivative backward (:class:`cgf_fhe.poly._PolyGrad`, the default).

    python benchmarks/poly_grad_memory.py runs/minilm/poly6-newton/seed42 --steps 4 \
        --json benchmarks/results/poly_grad_memory.json

Each mode runs in its own fresh subprocess (peak RSS is per process): the checkpoint is loaded in its training
form (guard on, as `distill` trains it), then ``--steps`` forward + backward passes of batch ``--batch-size``
on the first MRPC training examples (CE loss; the KD teacher costs the same in both modes and is left out).
Prints peak RSS, its growth over the loaded model, seconds per step (first step not timed), the relative
difference of the two modes' gradients, and the ratios, all measured in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(ckpt: str, steps: int, batch_size: int, mode: str, data_dir: str | None, grad_out: str) -> dict:
    from contextlib import nullcontext

    import torch
    from torch.utils.data import DataLoader

    from cgf_fhe import poly, surgery
    from cgf_fhe.models import load_checkpoint
    from cgf_fhe.training import api
    from cgf_fhe.training.evaluate import model_inputs
    from cgf_fhe.training.recipes import get_recipe

    model, tok, _ = load_checkpoint(ckpt)
    opts = api.RunOptions(data_dir=data_dir, max_train_samples=steps * batch_size, progress=False)
    train, _ = api.load_data(tok, opts, get_recipe("reference"))
    loader = DataLoader(train, batch_size=batch_size, shuffle=False, collate_fn=api.collator(tok))
    surgery.set_guard(model, True)
    model.train()
    for mod in model.modules():  # no dropout: both modes must compute the same gradients
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    before = _rss_mb()
    times, first = [], None
    with poly.autograd_through_schedule() if mode == "schedule" else nullcontext():
        for batch in loader:
            t0 = time.perf_counter()
            out = model(**model_inputs(batch, "cpu"), labels=batch["labels"])
            out.loss.backward()
            times.append(time.perf_counter() - t0)
            if first is None:
                first = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
    torch.save(first, grad_out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "rss_loaded_mb": before, "peak_rss_mb": peak, "growth_mb": peak - before,
            "seconds_per_step": sum(times[1:]) / (len(times) - 1) if len(times) > 1 else times[0],
            "steps": len(times), "batch_size": batch_size}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a polynomial student checkpoint folder (cgf-fhe distill --poly all)")
    ap.add_argument("--steps", type=int, default=4, help="training steps per mode (the first is not timed)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--data-dir", default=os.environ.get("CGF_FHE_DATA_DIR"))
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--child", choices=["schedule", "derivative"], help=argparse.SUPPRESS)
    ap.add_argument("--grad-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.checkpoint, a.steps, a.batch_size, a.child, a.data_dir, a.grad_out)))
        return 0
    import tempfile

    import torch

    res, grads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("schedule", "derivative"):
            gpath = os.path.join(tmp, f"{mode}.pt")
            cmd = [sys.executable, __file__, a.checkpoint, "--steps", str(a.steps), "--batch-size",
                   str(a.batch_size), "--child", mode, "--grad-out", gpath] + (
                       ["--data-dir", a.data_dir] if a.data_dir else [])
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                sys.stderr.write(p.stderr)
                raise SystemExit(f"the {mode} run failed (exit {p.returncode})")
            res[mode] = r = json.loads(p.stdout.strip().splitlines()[-1])
            grads[mode] = torch.load(gpath, weights_only=True)
            print(f"{mode:>10} backward: peak RSS {r['peak_rss_mb']:7.0f} MB (loaded model {r['rss_loaded_mb']:5.0f} MB, "
                  f"growth {r['growth_mb']:6.0f} MB), {r['seconds_per_step']:.2f} s/step")
    g0, g1 = grads["schedule"], grads["derivative"]
    # one global relative norm: per tensor it would compare float noise for tensors whose exact gradient is 0
    # (the attention key bias: CGF, like softmax, is invariant to a shift shared by all scores of a query)
    diff = sum(float(((g1[k] - g0[k]).double() ** 2).sum()) for k in g0) ** 0.5
    rel = diff / sum(float((g0[k].double() ** 2).sum()) for k in g0) ** 0.5
    res["ratio"] = {"peak_rss": res["derivative"]["peak_rss_mb"] / res["schedule"]["peak_rss_mb"],
                    "growth": res["derivative"]["growth_mb"] / res["schedule"]["growth_mb"],
                    "seconds_per_step": res["derivative"]["seconds_per_step"] / res["schedule"]["seconds_per_step"]}
    res["max_rel_grad_diff"] = rel
    res["command"] = "python benchmarks/poly_grad_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"derivative / schedule: peak RSS x{res['ratio']['peak_rss']:.2f}, growth x{res['ratio']['growth']:.2f}, "
          f"time per step x{res['ratio']['seconds_per_step']:.2f}; gradient difference (first batch, all "
          f"parameters) ||g_derivative - g_schedule|| / ||g_schedule|| = {rel:.1e}")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
