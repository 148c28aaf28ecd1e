"""``--coeff-bits`` takes the comma and the space form in every command that has it (one shared argparse action)."""
import pytest

from cgf_fhe.cli import build_parser

# each command with --coeff-bits, with the other arguments it requires
COMMANDS = {
    "simulate": ["simulate", "model.onnx", "-o", "out"],
    "calibrate-costs": ["calibrate-costs", "-o", "costs.json"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("bits", [["60,40,40,60"], ["60", "40", "40", "60"], ["60,40", "40", "60"], ["60, 40,40,60"]])
def test_both_forms_parse_to_the_same_tuple(command, bits):
    args = build_parser().parse_args(COMMANDS[command] + ["--coeff-bits", *bits])
    assert args.coeff_bits == (60, 40, 40, 60)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_default_stays_none(command):
    assert build_parser().parse_args(COMMANDS[command]).coeff_bits is None


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("bits, named", [(["60,4x,60"], "'4x'"), (["60", "forty", "60"], "'forty'"), ([","], "','")])
def test_bad_value_is_a_one_line_error_naming_it(command, bits, named, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(COMMANDS[command] + ["--coeff-bits", *bits])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and f"cgf-fhe {command}: error: --coeff-bits:" in err[0] and named in err[0], err


def test_simulate_config_gets_the_tuple():
    from cgf_fhe.simulate.cli import config_from_args

    args = build_parser().parse_args(COMMANDS["simulate"] + ["--coeff-bits", "60,40,40,40,60"])
    assert config_from_args(args).coeff_bits == (60, 40, 40, 40, 60)


@pytest.mark.parametrize("reps, named", [("0", ">= 1, got 0"), ("-3", ">= 1, got -3"), ("x", "'x'")])
def test_calibrate_costs_reps_below_one_is_a_one_line_error(reps, named, capsys):
    """`calibrate-costs --reps 0` was a StatisticsError traceback (median of no times): argparse refuses it."""
    from cgf_fhe.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["calibrate-costs", "--reps", reps, "-o", "costs.json"])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "cgf-fhe calibrate-costs: error: argument --reps: reps must be" in err[0], err
    assert named in err[0], err
    assert build_parser().parse_args(["calibrate-costs", "--reps", "1", "-o", "costs.json"]).reps == 1


def test_calibrate_api_refuses_zero_reps():
    from cgf_fhe.errors import UserError
    from cgf_fhe.export.costs import calibrate

    with pytest.raises(UserError, match="reps must be >= 1"):
        calibrate(8192, [60, 40, 40, 60], 40, reps=0)


@pytest.mark.parametrize("bits", [["60,40,40,40,60"], ["60", "40", "40", "40", "60"], ["60,40", "40", "40,60"]])
def test_emulator_calibration_benchmark_takes_both_forms(bits):
    """benchmarks/emulator_calibration.py uses the same action: its --coeff-bits parse to the tuple either way."""
    from benchlib import load_benchmark

    ap = load_benchmark("emulator_calibration").build_parser()
    assert ap.parse_args(["--coeff-bits", *bits]).coeff_bits == (60, 40, 40, 40, 60)
    assert ap.parse_args([]).coeff_bits == (60, 40, 40, 60)


def test_emulator_calibration_benchmark_bad_bits_is_a_one_line_error(capsys):
    from benchlib import load_benchmark

    with pytest.raises(SystemExit) as exc:
        load_benchmark("emulator_calibration").build_parser().parse_args(["--coeff-bits", "60", "4x", "60"])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "--coeff-bits" in err[0] and "'4x'" in err[0], err
