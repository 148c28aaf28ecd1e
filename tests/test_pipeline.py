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
    assert cfg["student"]["poly"] == "all"  # untouched keys keep the preset's value
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


def _fake_cli(calls, fail_on=None):
    """Stand-in for cgf_fhe.cli.main that records the stage commands and writes their outputs."""

    def fake(argv):
        calls.append(argv[0] if argv[0] != "report" else f"report-{argv[argv.index('--levels') + 1]}")
        if fail_on and argv[0] == fail_on:
            return 1
        out = argv[argv.index("-o") + 1] if "-o" in argv else None
        from pathlib import Path

        if argv[0] in ("finetune", "distill", "cover"):
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "cgf_fhe.json").write_text(json.dumps({"dev": {"accuracy": 0.5, "f1": 0.4}}))
        elif argv[0] == "export":
            Path(out).write_text("onnx")
        elif argv[0] == "report":
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "report.json").write_text(json.dumps({"total_depth": 10, "bootstraps_total": 1}))
        elif argv[0] == "simulate":
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "simulation.json").write_text(json.dumps({"accuracy": 0.5, "agreement": 1.0, "n_examples": 4}))
        return 0

    return fake


def test_pipeline_is_resumable_and_reruns_downstream(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("cgf_fhe.cli.main", _fake_cli(calls))
    cfg = pipeline.load_config(None, "smoke")
    run = tmp_path / "run"
    pipeline.run_pipeline(cfg, run)
    stages = ["finetune", "distill", "cover", "export", "check", "report-7", "report-14", "simulate"]
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
    names = [n for n, _, _ in pipeline.stage_plan(cfg, tmp_path, None)]
    assert "tenseal" not in names and "emulate" in names
    cfg["tenseal"]["enabled"] = True
    plan = {n: argv for n, argv, _ in pipeline.stage_plan(cfg, tmp_path, None)}
    assert plan["tenseal"][:4] == ["simulate", str(tmp_path / "student.onnx"), "--backend", "tenseal"]
    assert "--enabled" not in plan["tenseal"]



@pytest.mark.parametrize("preset", sorted(pipeline.PRESETS))
def test_every_stage_command_parses_with_the_real_cli(preset, tmp_path):
    from cgf_fhe.cli import build_parser

    cfg = pipeline.load_config(None, preset)
    cfg["tenseal"]["enabled"] = True
    parser = build_parser()
    for name, argv, _ in pipeline.stage_plan(cfg, tmp_path, "/data"):
        args = parser.parse_args(argv)  # argparse exits (SystemExit) on an unknown flag
        assert callable(args.func), name


def test_cover_stage_feeds_export_and_can_be_turned_off(tmp_path):
    cfg = pipeline.load_config(None, "smoke")
    plan = {n: argv for n, argv, _ in pipeline.stage_plan(cfg, tmp_path, None)}
    assert plan["cover"][:4] == ["cover", str(tmp_path / "student"), "-o", str(tmp_path / "student-cover")]
    assert plan["export"][1] == str(tmp_path / "student-cover")
    assert "--enabled" not in plan["cover"]
    cfg["cover"]["enabled"] = False
    plan = {n: argv for n, argv, _ in pipeline.stage_plan(cfg, tmp_path, None)}
    assert "cover" not in plan and plan["export"][1] == str(tmp_path / "student")
