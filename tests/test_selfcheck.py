"""`trickbench selfcheck`: the reduced CPU run, its verdicts, and the offline GPU profiles."""
import json
from pathlib import Path

import pytest
import torch

from bench.cli.main import main
from bench.config.matrix import load_matrix
from bench.diagnostics import selfcheck
from bench.tricks import TRICKS

ABLATIONS = Path(__file__).resolve().parent.parent / "ablations"
CUDA_ONLY = {"memory_reset", "precision_tf32", "tf32_switch", "two_devices", "physics_bf16_speedup"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU version")
def test_cpu_selfcheck_runs_the_reduced_checks_and_names_the_machine(tmp_path, capsys):
    out = tmp_path / "check"
    assert main(["selfcheck", "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads((out / "selfcheck.json").read_text())
    status = {c["name"]: c for c in record["checks"]}
    for name in CUDA_ONLY:
        assert status[name]["status"] == "skipped" and status[name]["detail"].startswith("skipped: no CUDA"), name
    for name in ("clock", "precision_fp32", "precision_fp16", "precision_bf16", "ddp_gloo",
                 "physics_activation_bytes", "channels_last", "compile"):  # compile for real: a graph made
        assert status[name]["status"] == "pass", status[name]
    # Activations at the peak: bf16 holds about half of fp32's, from the two runs' own breakdowns.
    figures = status["physics_activation_bytes"]["figures"]
    assert figures["ratio"] == pytest.approx(figures["bf16_bytes"] / figures["fp32_bytes"])
    report = (out / "report.md").read_text()
    assert record["environment"]["device_name"] in report and "| physics_activation_bytes | pass |" in report
    assert "skipped: no CUDA" in capsys.readouterr().out


def test_cuda_requested_without_cuda_is_refused(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    assert main(["selfcheck", "--device", "cuda", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: arguments: --device: cuda is not available")
    assert not (tmp_path / "x").exists()


def test_verdicts_follow_the_thresholds():
    fp32 = {"throughput_samples_per_s": 100.0, "memory_breakdown": {"activations": 1000}}
    assert selfcheck.speedup_verdict(fp32, {**fp32, "throughput_samples_per_s": 250.0}, cuda=True).status == "pass"
    assert selfcheck.speedup_verdict(fp32, {**fp32, "throughput_samples_per_s": 150.0}, cuda=True).status == "fail"
    assert selfcheck.speedup_verdict(fp32, fp32, cuda=False).detail.startswith("skipped: no CUDA")
    half = {**fp32, "memory_breakdown": {"activations": 520}}
    assert selfcheck.activation_verdict(fp32, half).status == "pass"
    assert selfcheck.activation_verdict(fp32, fp32).status == "fail"  # bf16 that stored fp32 activations


def test_a_check_that_raises_is_a_failure_and_the_others_still_run(monkeypatch, tmp_path):
    def broken():
        raise RuntimeError("CUDA error: no kernel image is available")

    monkeypatch.setattr(selfcheck, "all_checks", lambda ctx: [
        ("broken", broken), ("fine", lambda: selfcheck.passed("fine", "ok"))])
    results = selfcheck.run_checks(selfcheck.Context(torch.device("cpu"), tmp_path))
    assert [(r.name, r.status) for r in results] == [("broken", "fail"), ("fine", "pass")]
    assert "no kernel image" in results[0].detail


def test_tf32_switch_changes_matmul_precision_only_where_it_exists():
    # On CPU TF32 does not apply: the error is fp32's either way (the GPU check expects a gap).
    off, on = (selfcheck.matmul_error(torch.device("cpu"), tf32) for tf32 in (False, True))
    assert off < selfcheck.TF32_ERROR[0] and on < selfcheck.TF32_ERROR[0]
    assert not torch.backends.cuda.matmul.allow_tf32  # switched back off


@pytest.mark.parametrize("matrix", sorted(p.name for p in ABLATIONS.glob("*.yaml")))
def test_gpu_profiles_run_offline(matrix):
    """What run_all.sh runs on a GPU machine without CIFAR-10 and without a network."""
    text = (ABLATIONS / matrix).read_text()
    profiles = [""] + (["gpu1"] if "\n  gpu1:" in text else [])
    for profile in profiles:
        offline = ",".join(p for p in (profile, "offline") if p) if "\n  offline:" in text else profile
        loaded = load_matrix(ABLATIONS / matrix, profile=offline or None)
        for cell in loaded.cells:
            config = cell.config
            assert config.dataset in ("synthetic", "digits") and not config.download, (matrix, offline, cell.axes)
            size = config.image_size or 32
            assert size >= 16 or matrix == "ci.yaml", (matrix, size)  # realistic sizes, bar the CPU CI check


def test_concurrent_runs_start_separate_workers(tmp_path):
    """The two-GPU check's machinery, here on the CPU: two worker processes at once, two rows."""
    ctx = selfcheck.Context(torch.device("cpu"), tmp_path)
    broken = {"TRICKBENCH_FAULT": "raise@0"}  # the worker's own fault injection: a failed row
    # Each status is its own worker's: the broken one fails, the other trains.
    assert selfcheck.concurrent_runs(ctx, [broken, {"OMP_NUM_THREADS": "1"}]) == ["error", "ok"]


def test_gpu_physics_config_is_a_valid_run():
    from bench.training.feasibility import check_run

    for precision in ("fp32", "bf16"):
        config = selfcheck.resnet50_config(selfcheck.Context(torch.device("cpu"), Path(".")), precision)
        check_run(config)  # raises CellProblem when the model, data or run length do not fit
        assert config.tricks["precision"] == precision and config.dataset == "synthetic"


def test_a_check_that_cannot_run_fails_the_selfcheck(monkeypatch, tmp_path, capsys):
    """A check whose own config is refused (as `compile: True` was) or whose trick is missing is a
    failure, exit 1: a readiness report must not call a path it never exercised ready."""
    monkeypatch.setattr(selfcheck, "all_checks", lambda ctx: [
        ("compile", lambda: selfcheck.check_trick(ctx, "compile", True)),
        ("missing", lambda: selfcheck.check_trick(ctx, "no_such_trick", True))])
    assert main(["selfcheck", "--device", "cpu", "--out", str(tmp_path / "out")]) == 1
    record = json.loads((tmp_path / "out" / "selfcheck.json").read_text())
    assert [(c["name"], c["status"]) for c in record["checks"]] == [("compile", "fail"), ("no_such_trick", "fail")]
    assert "could not run" in capsys.readouterr().out


def test_the_compile_check_uses_a_value_the_compile_trick_accepts():
    assert TRICKS.get("compile").parse(selfcheck.COMPILE_MODE) == "default"
