"""Nothing lost: outputs checked before the work, written atomically, one writer per directory, disk full named."""
import errno
import json
import time

import pytest

from cgf_fhe import io
from cgf_fhe.cli import main
from cgf_fhe.errors import OutputError, UserError
from conftest import build_student


def _leftovers(folder):
    return sorted(p.name for p in folder.rglob(io.TMP_PREFIX + "*"))


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


# ---------------------------------------------------------------------------------------------------------------
# cgf_fhe.io
# ---------------------------------------------------------------------------------------------------------------
def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    f = tmp_path / "out.json"
    io.write_json(f, {"v": 1})
    assert json.loads(f.read_text()) == {"v": 1}

    def half_then_crash(tmp):
        tmp.write_text('{"v": 2, "trunc')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        io.atomic_write(f, half_then_crash)
    assert json.loads(f.read_text()) == {"v": 1}  # never the partial content
    assert _leftovers(tmp_path) == []


def test_disk_full_is_named_and_leaves_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setattr(io.os, "fsync", _enospc)
    f = tmp_path / "simulation.json"
    with pytest.raises(OutputError, match=f"disk full: {f}"):
        io.write_text(f, "x" * 1000)
    assert not f.exists() and _leftovers(tmp_path) == []


def test_output_checks(tmp_path):
    afile = tmp_path / "a.txt"
    afile.write_text("keep")
    with pytest.raises(OutputError, match="is a directory"):
        io.check_output_file(tmp_path)
    with pytest.raises(OutputError, match="not a directory"):
        io.check_output_dir(afile)
    with pytest.raises(OutputError, match="a.txt"):
        io.check_output_dir(afile / "sub")  # a parent is a file
    assert io.check_output_dir(tmp_path / "new" / "deeper").is_dir()
    assert afile.read_text() == "keep" and _leftovers(tmp_path) == []


def test_output_lock_refuses_a_second_writer(tmp_path):
    with io.output_lock(tmp_path):
        assert (tmp_path / io.LOCK_NAME).exists()
        with pytest.raises(OutputError, match="another cgf-fhe command is writing"):
            with io.output_lock(tmp_path):
                pass
    with io.output_lock(tmp_path):  # released again
        pass


def test_output_error_is_a_user_error():
    assert issubclass(OutputError, UserError)


# ---------------------------------------------------------------------------------------------------------------
# the commands: check outputs before the work
# ---------------------------------------------------------------------------------------------------------------
def test_export_to_a_directory_fails_before_loading(tmp_path, capsys):
    t0 = time.perf_counter()
    # the checkpoint does not even exist: the output is checked first, so that is the error reported
    assert main(["export", str(tmp_path / "no-such-ckpt"), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "Traceback" not in err
    assert time.perf_counter() - t0 < 5


def test_report_and_simulate_refuse_a_file_as_output_dir(tmp_path, capsys):
    afile = tmp_path / "taken"
    afile.write_text("mine")
    assert main(["report", str(tmp_path / "x.onnx"), "-o", str(afile)]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["simulate", str(tmp_path / "x.onnx"), "-o", str(afile), "--no-progress"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert afile.read_text() == "mine"


def test_unwritable_output_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["simulate", str(tmp_path / "x.onnx"), "-o", str(blocker / "sub"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "file" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------------
# training outputs: never replace an input or a finished run silently
# ---------------------------------------------------------------------------------------------------------------
def _finished(folder, acc=0.8123):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cgf_fhe.json").write_text(json.dumps({"kind": "finetune", "status": "done", "dev": {"accuracy": acc}}))
    return folder


def test_distill_refuses_to_write_over_its_teacher(tmp_path, capsys, mrpc_dir):
    teacher = _finished(tmp_path / "T")
    before = (teacher / "cgf_fhe.json").read_text()
    assert main(["distill", "--teacher", str(teacher), "--data-dir", str(mrpc_dir), "-o", str(teacher),
                 "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is the --teacher input" in err
    # even --overwrite does not make replacing the input legal
    assert main(["distill", "--teacher", str(teacher), "-o", str(tmp_path / "." / "T"), "--overwrite"]) == 2
    assert (teacher / "cgf_fhe.json").read_text() == before


def test_finetune_over_a_finished_run_needs_overwrite(tmp_path, capsys, mrpc_dir):
    out = _finished(tmp_path / "ck")
    argv = ["finetune", "--model", "tiny", "--data-dir", str(mrpc_dir), "--max-train-samples", "16",
            "--max-eval-samples", "8", "--epochs", "1", "--batch-size", "8", "--max-length", "32", "--no-progress",
            "-o", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds a finished finetune run (dev accuracy 0.8123)" in err and "--overwrite" in err
    assert json.loads((out / "cgf_fhe.json").read_text())["dev"]["accuracy"] == 0.8123
    assert main(argv + ["--overwrite"]) == 0
    st = json.loads((out / "cgf_fhe.json").read_text())
    assert st["dev"]["n"] == 8 and st["recipe"]["epochs"] == 1


# ---------------------------------------------------------------------------------------------------------------
# inputs: empty data, models that are not models
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "validation"])
def test_header_only_split_is_a_data_error(tmp_path, mrpc_dir, capsys, split):
    d = tmp_path / "mrpc"
    d.mkdir()
    for s in ("train", "validation"):
        src = (mrpc_dir / f"{s}.tsv").read_text().splitlines(keepends=True)
        (d / f"{s}.tsv").write_text("".join(src[:1] if s == split else src[:40]))
    out = tmp_path / "ck"
    assert main(["finetune", "--model", "tiny", "--data-dir", str(d), "--epochs", "1", "--max-length", "32",
                 "--no-progress", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{split}.tsv: no examples (only the header line)" in err
    assert not (out / "cgf_fhe.json").exists()


def test_model_names_that_are_not_models(tmp_path, capsys, mrpc_dir):
    from cgf_fhe.errors import ModelNameError
    from cgf_fhe.models import build_model

    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(ModelNameError, match="the folder holds no model"):
        build_model(str(empty))
    with pytest.raises(ModelNameError, match="not a local folder and not loadable from the hub"):
        build_model("surely-not-a-model-name-xyz")
    assert issubclass(ModelNameError, UserError)
    rc = main(["finetune", "--model", "foo", "--data-dir", str(mrpc_dir), "--no-progress", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--model foo" in err and "tiny" in err and "minilm" in err


# ---------------------------------------------------------------------------------------------------------------
# simulate: what the graph and the parameters decide fails before any encryption
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro(tmp_path_factory, mrpc_dir, tiny_tokenizer):
    """The micro exported student of tests/conftest.py (hidden 8, 1 layer, <= 6 tokens)."""
    return build_student(tmp_path_factory.mktemp("safety_micro"), tiny_tokenizer, mrpc_dir)


def _simulate(micro, out, *extra):
    return main(["simulate", str(micro / "student.onnx"), "--no-progress", "--limit", "4", "-o", str(out), *extra])


def test_simulate_refuses_too_few_levels_without_refreshes_before_encrypting(micro, tmp_path, capsys, monkeypatch):
    from cgf_fhe.simulate import runner

    def no_work(*a, **k):
        raise AssertionError("encryption started")

    monkeypatch.setattr(runner, "client_batches", no_work)
    assert _simulate(micro, tmp_path / "o", "--backend", "tenseal", "--refresh", "none", "--poly-modulus", "8192",
                     "--coeff-bits", "60,40,40,60") == 2
    err = capsys.readouterr().err
    assert "--refresh none: the graph's multiplicative depth is" in err and "gives 2 levels" not in err
    assert "parameters give 2 levels" in err


def test_simulate_insecure_tenseal_is_explained(micro, tmp_path, capsys):
    assert _simulate(micro, tmp_path / "o", "--backend", "tenseal", "--insecure", "--poly-modulus", "8192",
                     "--levels", "5") == 2
    err = capsys.readouterr().err
    assert "--insecure does not work with --backend tenseal" in err and "SEAL" in err and "Traceback" not in err


def test_simulate_without_metadata_does_not_suggest_a_missing_flag(micro, tmp_path, capsys):
    import onnx

    m = onnx.load(str(micro / "student.onnx"))
    del m.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(m, str(bare))
    rc = main(["simulate", str(bare), "--checkpoint", str(micro / "ckpt"), "--no-progress", "--limit", "4",
               "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "declares no encrypted input" in err and "cgf-fhe export" in err
    assert "--encrypted" not in err  # simulate has no such flag


@pytest.mark.parametrize("coeffs,bad", [(["0.5", "-1"], "-1.0"), (["0", "0.5"], "0.0"), (["nan"], "nan"),
                                        (["inf"], "inf")])
def test_sweep_refuses_a_bad_coefficient_before_any_work(coeffs, bad, tmp_path, capsys, monkeypatch):
    from cgf_fhe.training import api

    monkeypatch.setattr(api, "sweep", lambda *a, **k: pytest.fail("the sweep started"))
    out = tmp_path / "sw"
    assert main(["sweep", "--model", "tiny", "--coeffs", *coeffs, "--no-progress", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--coeffs must be > 0 and finite" in err and f"got {bad}" in err
    assert not out.exists()


def test_sweep_refuses_a_repeated_coefficient(tmp_path, capsys):
    assert main(["sweep", "--model", "tiny", "--coeffs", "0.5", "0.8", "0.50", "-o", str(tmp_path / "sw")]) == 2
    err = capsys.readouterr().err
    assert "--coeffs lists 0.5 twice" in err and not (tmp_path / "sw").exists()


def test_nonsense_values_are_refused_and_odd_ones_warned(tmp_path, capsys, mrpc_dir):
    base = ["finetune", "--model", "tiny", "--data-dir", str(mrpc_dir), "--no-progress", "-o", str(tmp_path / "o")]
    assert main([*base, "--softmax", "cgf", "--coeff", "-1"]) == 2
    assert "--coeff must be > 0" in capsys.readouterr().err
    assert main([*base, "--max-length", "2"]) == 2
    assert "--max-length 2 is too short for a sentence pair" in capsys.readouterr().err
    assert main(["distill", "--model", "tiny", "--coeff", "-1", "-o", str(tmp_path / "d")]) == 2
    assert "--coeff must be > 0" in capsys.readouterr().err
    assert main(["simulate", str(tmp_path / "x.onnx"), "--max-length", "2", "-o", str(tmp_path / "s")]) == 2
    assert "too short" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()
    # legal but odd: a warning, and the run goes on
    from cgf_fhe.data import check_max_length

    assert check_max_length(8) == 8 and "truncates most MRPC pairs" in capsys.readouterr().err
    assert check_max_length(1024) == 1024 and "exceeds the 512 positions" in capsys.readouterr().err
    assert check_max_length(128) == 128 and capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------------------------
# help: fast, for users, complete
# ---------------------------------------------------------------------------------------------------------------
def _run_cli(*argv, module="cgf_fhe"):
    return _run_python("-m", module, *argv)


def _run_python(*argv):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=120)
    return r, time.perf_counter() - t0


def test_top_level_help_is_fast_and_for_users():
    r, secs = _run_cli("--help")
    assert r.returncode == 0, r.stderr
    assert "register(" not in r.stdout and "``" not in r.stdout
    assert "cgf-fhe pipeline --preset smoke" in r.stdout and "pipeline" in r.stdout and "simulate" in r.stdout
    best = min(secs, *(_run_cli("--help")[1] for _ in range(2)))  # best of 3 on a loaded machine
    assert best < 1.0, f"cgf-fhe --help took {best:.2f} s"
    # importing the CLI must not pull the heavy libraries in
    r, _ = _run_python("-c", "import sys, cgf_fhe.cli as c; c.build_parser(); "
                       "print(sorted(m for m in ('torch', 'transformers', 'onnx', 'datasets') if m in sys.modules))")
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


def test_pipeline_help_describes_it_and_lists_stages():
    r, _ = _run_cli("pipeline", "--help", module="cgf_fhe.cli")
    assert r.returncode == 0
    for word in ("teacher", "student", "cover", "export", "check", "report-L<L>", "emulate-L<L>", "levels:"):
        assert word in r.stdout, word


def test_every_option_has_help_and_output_is_spelt_output():
    import argparse

    from cgf_fhe.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        assert p.description or name in ("evaluate", "sweep"), name
        for a in p._actions:
            if a.dest != "help":
                assert a.help, f"cgf-fhe {name} {a.option_strings or a.dest}: no help"
            if "-o" in a.option_strings:
                assert "--output" in a.option_strings, f"cgf-fhe {name}: -o is {a.option_strings}"
    args = build_parser().parse_args(["simulate", "m.onnx", "--output-dir", "old"])  # the old spelling still works
    assert args.output_dir == "old"


def test_no_progress_silences_the_datasets_bars(micro, tmp_path, capsys, mrpc_dir, monkeypatch):
    import sys

    import datasets

    # datasets reads HF_DATASETS_DISABLE_PROGRESS_BARS once, at its first import: when an earlier --no-progress
    # command of this session set it (cgf_fhe.cli._quiet_datasets) before that, enable_progress_bars() is refused
    monkeypatch.setattr(sys.modules[datasets.enable_progress_bars.__module__], "HF_DATASETS_DISABLE_PROGRESS_BARS",
                        None)  # as if the variable were unset
    monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS", raising=False)
    datasets.enable_progress_bars()
    # a map answered from the datasets cache (an earlier run of the same tokenization) shows no bar at all
    monkeypatch.setattr(datasets.arrow_dataset, "is_caching_enabled", lambda: False)
    argv = ["simulate", str(micro / "student.onnx"), "--backend", "plain", "--limit", "4", "--data-dir",
            str(mrpc_dir)]
    assert main([*argv, "-o", str(tmp_path / "a")]) == 0
    assert "Map" in capsys.readouterr().err  # the bar this test is about exists...
    assert main([*argv, "--no-progress", "-o", str(tmp_path / "b")]) == 0
    assert "Map" not in capsys.readouterr().err  # ...and --no-progress silences it
    datasets.enable_progress_bars()


def test_disk_full_during_simulate_and_training_state_is_named_with_no_partial_file(micro, tmp_path, capsys,
                                                                                   monkeypatch, mrpc_dir):
    monkeypatch.setattr(io.os, "fsync", _enospc)
    out = tmp_path / "sim"
    assert main(["simulate", str(micro / "student.onnx"), "--backend", "plain", "--limit", "4", "--no-progress",
                 "--data-dir", str(mrpc_dir), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "disk full: " in err and str(out) in err and "Traceback" not in err
    assert not (out / "simulation.json").exists() and _leftovers(out) == []
    from cgf_fhe.training.engine import _atomic_save

    def torch_save_enospc(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("torch.save", torch_save_enospc)
    state = tmp_path / "best_model.pt"
    with pytest.raises(OutputError, match=f"disk full: {state}"):
        _atomic_save({"x": 1}, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim"]  # no best_model.pt, no best_model.pt.tmp


def test_diverged_record_is_written_atomically(tmp_path, monkeypatch):
    """train_state/diverged.json goes through cgf_fhe.io: a full disk while writing it is "disk full: PATH" and
    leaves neither the file nor a temporary one; a normal write gives the whole record."""
    from cgf_fhe.training.engine import DIVERGED_FILE, _diverged

    class Schedule:
        def divergence_info(self):
            return {"blend": None}

    kw = dict(epoch=1, step=7, at=0.5, epochs=2, mean_before=1.25, schedule=Schedule(), history=[],
              state_dir=tmp_path, write=True)
    with monkeypatch.context() as m:
        m.setattr(io.os, "fsync", _enospc)
        with pytest.raises(OutputError, match=f"disk full: {tmp_path / DIVERGED_FILE}"):
            _diverged("s", float("nan"), {"kd": float("inf")}, **kw)
    assert list(tmp_path.iterdir()) == []
    exc = _diverged("s", float("nan"), {"kd": float("inf")}, **kw)
    rec = json.loads((tmp_path / DIVERGED_FILE).read_text())
    assert rec == json.loads(json.dumps(exc.record, default=str)) and rec["step"] == 7 and rec["parts"] == {"kd": "inf"}
    assert _leftovers(tmp_path) == []
