"""The pipeline orchestrator (config, resumability) and the user-facing errors of the CLI."""
import json

import pytest

from cgf_fhe import pipeline
from cgf_fhe.cli import UserError, main


def test_config_override_merges_yaml_and_toml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("student:\n  epochs: 3\nmax_length: 48\n")
    cfg = pipeline.load_config(str(y), "smoke")
    assert cfg["student"]["epochs"] == 3 and cfg["max_length"] == 48
    assert cfg["student"]["fhe_profile"] == "lean"  # untouched keys keep the preset's value
    t = tmp_path / "c.toml"
    t.write_text("[teacher]\nseed = 7\n")
    assert pipeline.load_config(str(t), "smoke")["teacher"]["seed"] == 7


def test_config_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        pipeline.load_config(str(tmp_path / "missing.yaml"), None)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="bad.yaml"):
        pipeline.load_config(str(bad), None)


def _fake_cli(calls, fail_on=None, onnx_text=("onnx",)):
    """Stand-in for cgf_fhe.cli.main that records the stage commands and writes their outputs."""

    def fake(argv):
        calls.append(f"{argv[0]}-{argv[argv.index('--levels') + 1]}" if argv[0] in ("report", "simulate")
                     else argv[0])
        if fail_on and argv[0] == fail_on:
            return 1
        out = argv[argv.index("-o") + 1] if "-o" in argv else None
        from pathlib import Path

        if argv[0] in ("finetune", "distill", "cover"):
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "cgf_fhe.json").write_text(json.dumps({"dev": {"accuracy": 0.5, "f1": 0.4}}))
        elif argv[0] == "export":
            Path(out).write_text(onnx_text[0])
        elif argv[0] == "report":
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "report.json").write_text(json.dumps({"total_depth": 10, "bootstraps_total": 1}))
        elif argv[0] == "simulate":
            Path(out).mkdir(parents=True, exist_ok=True)
            lv = int(argv[argv.index("--levels") + 1])
            (Path(out) / "simulation.json").write_text(json.dumps({"accuracy": 0.5 + lv / 100, "agreement": 1.0,
                                                                   "n_examples": 4, "level_budget": lv}))
        return 0

    return fake


def test_pipeline_is_resumable_and_reruns_downstream(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("cgf_fhe.cli.main", _fake_cli(calls))
    cfg = pipeline.load_config(None, "smoke")
    run = tmp_path / "run"
    pipeline.run_pipeline(cfg, run)
    stages = ["finetune", "distill", "cover", "export", "check", "report-7", "report-14", "simulate-7",
              "simulate-14"]
    assert calls == stages
    calls.clear()
    pipeline.run_pipeline(cfg, run)  # everything up to date
    assert calls == []
    # a changed student config reruns the student and everything after it, not the teacher
    cfg["student"]["epochs"] = 2
    pipeline.run_pipeline(cfg, run)
    assert calls == stages[1:]
    summary = (run / "summary.md").read_text()
    assert "0.5000" in summary and "| 7 | 10 | 1 |" in summary


def test_pipeline_stage_failure_names_the_stage(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("cgf_fhe.cli.main", _fake_cli(calls, fail_on="export"))
    with pytest.raises(UserError, match="stage 'export' failed"):
        pipeline.run_pipeline(pipeline.load_config(None, "smoke"), tmp_path / "run")
    assert calls == ["finetune", "distill", "cover", "export"]


def test_missing_and_corrupt_checkpoint_errors(tmp_path, capsys, mrpc_dir):
    assert main(["evaluate", str(tmp_path / "nope"), "--data-dir", str(mrpc_dir)]) == 2
    assert "nope" in capsys.readouterr().err
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "cgf_fhe.json").write_text("{not json")
    assert main(["evaluate", str(ck), "--data-dir", str(mrpc_dir)]) == 2
    err = capsys.readouterr().err
    assert "cgf_fhe.json" in err and "not valid JSON" in err


def test_tenseal_spot_check_is_opt_in_for_smoke(tmp_path):
    cfg = pipeline.load_config(None, "smoke")
    names = [n for n, *_ in pipeline.stage_plan(cfg, tmp_path, None)]
    assert "tenseal" not in names and "emulate-L7" in names and "emulate-L14" in names
    cfg["tenseal"]["enabled"] = True
    plan = {n: argv for n, argv, *_ in pipeline.stage_plan(cfg, tmp_path, None)}
    assert plan["tenseal"][:4] == ["simulate", str(tmp_path / "student.onnx"), "--backend", "tenseal"]
    assert "--enabled" not in plan["tenseal"]



@pytest.mark.parametrize("preset", sorted(pipeline.PRESETS))
def test_every_stage_command_parses_with_the_real_cli(preset, tmp_path):
    from cgf_fhe.cli import build_parser

    cfg = pipeline.load_config(None, preset)
    cfg["tenseal"]["enabled"] = True
    parser = build_parser()
    for name, argv, *_ in pipeline.stage_plan(cfg, tmp_path, "/data"):
        args = parser.parse_args(argv)  # argparse exits (SystemExit) on an unknown flag
        assert callable(args.func), name


def test_cover_stage_feeds_export_and_can_be_turned_off(tmp_path):
    cfg = pipeline.load_config(None, "smoke")
    plan = {n: argv for n, argv, *_ in pipeline.stage_plan(cfg, tmp_path, None)}
    assert plan["cover"][:4] == ["cover", str(tmp_path / "student"), "-o", str(tmp_path / "student-cover")]
    assert plan["export"][1] == str(tmp_path / "student-cover")
    assert "--enabled" not in plan["cover"]
    cfg["cover"]["enabled"] = False
    plan = {n: argv for n, argv, *_ in pipeline.stage_plan(cfg, tmp_path, None)}
    assert "cover" not in plan and plan["export"][1] == str(tmp_path / "student")


# ---------------------------------------------------------------------------------------------------------------
# honest resumption (#26): the data, every input's content and every output's content decide "up to date"
# ---------------------------------------------------------------------------------------------------------------
def _data(folder, extra=""):
    folder.mkdir(parents=True, exist_ok=True)
    head = "label\tsentence1\tsentence2\tidx\n"
    (folder / "train.tsv").write_text(head + "1\ta\tb\t0\n" + extra)
    (folder / "validation.tsv").write_text(head + "0\tc\td\t1\n")
    return folder


def _run(cfg, run, calls, **kw):
    calls.clear()
    pipeline.run_pipeline(cfg, run, **kw)
    return list(calls)


def test_changing_the_data_reruns_everything_that_reads_it(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("cgf_fhe.cli.main", _fake_cli(calls))
    cfg, run = pipeline.load_config(None, "smoke"), tmp_path / "run"
    d = _data(tmp_path / "d1")
    monkeypatch.setenv("CGF_FHE_DATA_DIR", str(d))
    assert _run(cfg, run, calls)[0] == "finetune"
    assert _run(cfg, run, calls) == []
    # same folder, other content: the teacher (and so everything) reruns; the stages get the resolved folder
    _data(d, extra="0\te\tf\t2\n")
    assert _run(cfg, run, calls)[0] == "finetune"
    stamp = json.loads((run / ".stages" / "teacher.json").read_text())
    assert stamp["data"]["source"] == str(d.resolve()) and stamp["argv"][stamp["argv"].index("--data-dir") + 1] == str(d.resolve())
    # another folder given by --data-dir instead of the environment
    d2 = _data(tmp_path / "d2")
    assert _run(cfg, run, calls, data_dir=str(d2))[0] == "finetune"
    monkeypatch.setenv("CGF_FHE_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(Exception, match="nowhere"):  # a data folder that does not exist fails before any stage
        _run(cfg, run, calls)
    assert calls == []


def test_outputs_are_validated_before_a_stage_is_skipped(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("cgf_fhe.cli.main", _fake_cli(calls))
    monkeypatch.delenv("CGF_FHE_DATA_DIR", raising=False)
    cfg, run = pipeline.load_config(None, "smoke"), tmp_path / "run"
    _run(cfg, run, calls)
    (run / "emulate-L7" / "simulation.json").write_text("")  # 0 bytes (a disk-full leftover): not done
    assert _run(cfg, run, calls) == ["simulate-7"]
    (run / ".stages" / "report-L14.json").write_text('{"sha256": "ab')  # truncated stamp: stale, no traceback
    assert _run(cfg, run, calls) == ["report-14"]
    (run / ".stages" / "check.json").write_text("[1, 2]")  # valid JSON, wrong shape
    assert _run(cfg, run, calls)[0] == "check"
    # an output edited by hand is not what its stage wrote: that stage and what reads it run again
    (run / "student.onnx").write_text("edited")
    downstream = ["check", "report-7", "report-14", "simulate-7", "simulate-14"]
    assert _run(cfg, run, calls) == ["export", *downstream]
    assert _run(cfg, run, calls) == []


def test_a_changed_input_file_reruns_its_readers_across_invocations(tmp_path, monkeypatch):
    calls, onnx_text = [], ["onnx v1"]
    monkeypatch.setattr("cgf_fhe.cli.main", _fake_cli(calls, onnx_text=onnx_text))
    cfg, run = pipeline.load_config(None, "smoke"), tmp_path / "run"
    _run(cfg, run, calls)
    (run / ".stages" / "export.json").unlink()
    onnx_text[0] = "onnx v2"
    assert _run(cfg, run, calls, only=["export"]) == ["export"]  # only export ran: its readers are now stale
    assert _run(cfg, run, calls) == ["check", "report-7", "report-14", "simulate-7", "simulate-14"]
    assert _run(cfg, run, calls) == []


def test_only_validates_stage_names_and_report_is_an_alias(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("cgf_fhe.cli.main", _fake_cli(calls))
    cfg, run = pipeline.load_config(None, "smoke"), tmp_path / "run"
    _run(cfg, run, calls)
    for f in run.glob("report-L*/report.json"):
        f.unlink()
    assert _run(cfg, run, calls, only=["report"]) == ["report-7", "report-14"]
    with pytest.raises(UserError, match=r"unknown stage 'reports'.*did you mean 'report'.*teacher, student, cover"):
        _run(cfg, run, calls, only=["reports"])
    assert main(["pipeline", "--only", "simulate", "-o", str(run)]) == 2
    err = capsys.readouterr().err
    assert "unknown stage 'simulate'" in err and "emulate-L7" in err and "Traceback" not in err


def test_the_whole_config_is_validated_before_any_stage(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("cgf_fhe.cli.main", _fake_cli(calls))
    cases = {
        "studnet:\n  epochs: 2\n": r"unknown key 'studnet' \(did you mean 'student'\?\)",
        "student:\n  epoch: 2\n": r"student.epoch: `cgf-fhe distill` has no option --epoch \(did you mean 'epochs'\?\)",
        "emulate:\n  limit: many\n": r"stage 'emulate-L7'.*--limit: invalid int value: 'many'",
        "levels: [7, 0]\n": r"levels must be a non-empty list",
        "report:\n  levels: [9]\n": r"top-level `levels:`",
        "teacher:\n  data_dir: /x\n": r"teacher.data_dir is set by the pipeline",
    }
    for text, pattern in cases.items():
        c = tmp_path / "c.yaml"
        c.write_text(text)
        with pytest.raises(UserError, match=pattern):
            pipeline.load_config(str(c), "smoke")
    cfg = pipeline.load_config(None, "smoke")
    cfg["export"]["verfy"] = 3  # an edited dict (API use) is validated by run_pipeline too
    with pytest.raises(UserError, match="export.verfy"):
        pipeline.run_pipeline(cfg, tmp_path / "run")
    assert calls == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("preset", sorted(pipeline.PRESETS))
def test_one_levels_list_drives_report_and_emulate_and_the_summary_names_budgets(preset, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("cgf_fhe.cli.main", _fake_cli(calls))
    cfg = pipeline.load_config(None, preset)
    levels = cfg["levels"]
    plan = {n: argv for n, argv, *_ in pipeline.stage_plan(cfg, tmp_path, None)}
    for lv in levels:
        assert plan[f"report-L{lv}"][plan[f"report-L{lv}"].index("--levels") + 1] == str(lv)
        assert plan[f"emulate-L{lv}"][plan[f"emulate-L{lv}"].index("--levels") + 1] == str(lv)
    assert not any(n == "emulate" for n in plan)
    summary = pipeline.run_pipeline(cfg, tmp_path / "run")
    md = (tmp_path / "run" / "summary.md").read_text()
    for lv in levels:  # the fake emulation at L scores 0.5 + L/100: each row must show its own budget's figure
        assert f"| student, emulated CKKS at L={lv} | {lv} | {0.5 + lv / 100:.4f} |" in md
        assert f"| emulate | {lv} | 1.0000 |" in md
        assert f"| {lv} | 10 | 1 |" in md
    assert summary["emulate_by_level"][str(levels[-1])]["level_budget"] == levels[-1]
    assert summary["emulate"]["level_budget"] == levels[0]
