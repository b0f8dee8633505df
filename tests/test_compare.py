"""The verdict engine on synthetic rows: one rule per tier, environments, missing data, outputs."""
import copy
import json

import pytest

from bench.cli.main import main
from bench.regression import compare as cmp
from bench.regression import sides
from bench.regression.baseline import baseline_document, updated_document
from bench.reports.stats import all_cell_stats

ENV = {"torch": "2.14.1", "device": "cpu", "device_name": "CPU A", "cpu_model": "CPU A",
       "cpu_capability": "AVX2", "cpu_cores": 2, "torch_threads": 2}
STEP_MS = {0: 20.0, 1: 21.0, 2: 19.5}  # run-level medians: a few % apart, as on a quiet machine


def row(cell="c1", seed=0, **changes):
    """A finished run's row; ``changes`` override top-level keys (dotted: nested ones)."""
    r = {"schema_version": 2, "matrix": "toy", "cell_id": cell, "seed": seed, "axes": {"sam": None if cell == "c1" else 0.05},
         "status": "ok", "error": None, "flops_per_step": 1000, "peak_memory_bytes": 5000,
         "memory_breakdown": {"parameters": 1000, "activations": 3000, "other": 1000}, "steps": 8,
         "final_train_loss": 1.5 + seed / 10, "step_time_ms_median": STEP_MS[seed],
         "throughput_samples_per_s": 32_000 / STEP_MS[seed], "accuracy_top1": 0.90 + seed / 100,
         "env": dict(ENV)}
    for key, value in changes.items():
        target = r
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return r


def rows(cells=("c1", "c2"), **changes):
    return [row(c, s, **changes) for s in (0, 1, 2) for c in cells]


def verdicts(base_rows, new_rows, **policy):
    found = cmp.compare_cells(sides.cells_from_rows(base_rows), sides.cells_from_rows(new_rows), cmp.Policy(**policy))
    return found, {(v.cell_id, v.metric): v for v in found}


def test_identical_rows_pass_every_metric_in_any_row_order():
    found, _ = verdicts(rows(), list(reversed(rows())))
    assert {v.verdict for v in found} == {cmp.PASS}
    assert {v.metric for v in found} == {m.name for m in cmp.METRICS} - {
        "memory_breakdown.buffers", "memory_breakdown.optimizer_state", "memory_breakdown.gradients",
        "memory_breakdown.trick_state", "memory_breakdown.untracked", "benchmark_median_s", "instructions_per_step"}  # absent on both sides: no verdict, no crash
    assert cmp.exit_code(found) == 0


@pytest.mark.parametrize("activations, expected", [(3001, cmp.REGRESSED), (2999, cmp.IMPROVED)])
def test_any_byte_of_change_fails_either_way_and_prints_the_new_value(activations, expected):
    found, by = verdicts(rows(), rows(**{"memory_breakdown.activations": activations}))
    v = by[("c1", "memory_breakdown.activations")]
    assert v.verdict == expected and v.fails and v.new == f"{activations:,}"
    assert cmp.exit_code(found) == 1
    if expected == cmp.IMPROVED:
        assert "update the baseline" in v.note


def test_loss_is_bit_exact_on_one_cpu_capability_and_tolerant_across():
    nudged = [dict(r, final_train_loss=r["final_train_loss"] * (1 + 1e-6)) for r in rows()]
    _, by = verdicts(rows(), nudged)
    assert by[("c1", "final_train_loss")].verdict == cmp.REGRESSED
    for r in nudged:
        r["env"]["cpu_capability"] = "AVX512"
    _, by = verdicts(rows(), nudged)
    assert by[("c1", "final_train_loss")].verdict == cmp.PASS
    far = [dict(r, final_train_loss=r["final_train_loss"] * 1.01) for r in nudged]
    assert verdicts(rows(), far)[1][("c1", "final_train_loss")].verdict == cmp.REGRESSED


def slowed(factor, jitter=(1.0, 1.0, 1.0)):
    return [row(c, s, step_time_ms_median=STEP_MS[s] * factor * jitter[s],
                throughput_samples_per_s=32_000 / (STEP_MS[s] * factor * jitter[s]))
            for s in (0, 1, 2) for c in ("c1", "c2")]


def test_timing_needs_the_ratio_and_the_test_and_warns_unless_strict():
    found, by = verdicts(rows(), slowed(1.5))
    v = by[("c1", "step_time_ms_median")]
    assert v.verdict == cmp.REGRESSED and not v.fails and cmp.exit_code(found) == 0
    assert by[("c1", "throughput_samples_per_s")].verdict == cmp.REGRESSED
    strict, by = verdicts(rows(), slowed(1.5), strict=True)
    assert by[("c1", "step_time_ms_median")].fails and cmp.exit_code(strict) == 1
    # Significant but small: within the factor.
    assert verdicts(rows(), slowed(1.05))[1][("c1", "step_time_ms_median")].verdict == cmp.PASS
    # Beyond the factor on the median, but the runs scatter over it: noise.
    noisy = verdicts(rows(), slowed(1.3, jitter=(0.5, 1.0, 1.8)))[1]
    assert noisy[("c1", "step_time_ms_median")].verdict == cmp.NOISE
    assert verdicts(rows(), slowed(0.6))[1][("c1", "step_time_ms_median")].verdict == cmp.IMPROVED


def test_timing_with_fewer_than_three_runs_is_noise_not_a_verdict():
    two = [r for r in slowed(2.0) if r["seed"] < 2]
    v = verdicts(rows(), two, strict=True)[1][("c1", "step_time_ms_median")]
    assert v.verdict == cmp.NOISE and not v.fails


def test_timing_under_competing_load_is_not_comparable_even_when_strict():
    loaded = slowed(1.5)
    for r in loaded:
        r.update(load_avg_1m_start=0.5, load_avg_1m_end=3.5)  # 2 cores: 3.5 > 1.25 × 2
    found, by = verdicts(rows(), loaded, strict=True)
    v = by[("c1", "step_time_ms_median")]
    assert v.verdict == cmp.NOT_COMPARABLE and not v.fails and "3 new runs" in v.note
    assert cmp.exit_code(found) == 0
    quiet = slowed(1.5)
    for r in quiet:
        r.update(load_avg_1m_start=0.5, load_avg_1m_end=1.5)
    assert verdicts(rows(), quiet, strict=True)[1][("c1", "step_time_ms_median")].fails


def test_accuracy_regresses_only_outside_the_seeds_interval():
    small = [dict(r, accuracy_top1=r["accuracy_top1"] - 0.005) for r in rows()]
    spread = [dict(r, accuracy_top1=r["accuracy_top1"] + (r["seed"] - 1) * 0.02) for r in rows()]
    assert verdicts(spread, small)[1][("c1", "accuracy_top1")].verdict == cmp.PASS
    big = [dict(r, accuracy_top1=r["accuracy_top1"] - 0.2) for r in rows()]
    v = verdicts(spread, big)[1][("c1", "accuracy_top1")]
    assert v.verdict == cmp.REGRESSED and v.fails


def test_missing_new_and_failed_cells():
    failed = [r if r["cell_id"] == "c1" else dict(r, status="oom", error="out of memory") for r in rows()]
    found, by = verdicts(rows(), failed)
    assert by[("c2", cmp.CELL)].verdict == cmp.MISSING and "oom" in by[("c2", cmp.CELL)].note
    assert cmp.exit_code(found) == 1
    one_seed_diverged = [dict(r, status="diverged", error="non-finite loss") if r["seed"] == 2 else r for r in rows()]
    found, by = verdicts(rows(), one_seed_diverged)
    assert by[("c1", cmp.CELL)].verdict == cmp.MISSING and "diverged seed=2" in by[("c1", cmp.CELL)].note
    assert by[("c1", "flops_per_step")].verdict == cmp.PASS and cmp.exit_code(found) == 1
    found, by = verdicts(rows(cells=("c1",)), rows())
    assert by[("c2", cmp.CELL)].verdict == cmp.NEW and cmp.exit_code(found) == 0
    found, by = verdicts(rows(), rows(cells=("c1",)))
    assert by[("c2", cmp.CELL)].verdict == cmp.MISSING and cmp.exit_code(found) == 1


def test_a_breakdown_key_added_or_removed_is_new_or_missing_not_a_crash():
    added = rows(**{"memory_breakdown.trick_state": 64})
    _, by = verdicts(rows(), added)
    assert by[("c1", "memory_breakdown.trick_state")].verdict == cmp.NEW
    removed = copy.deepcopy(rows())
    for r in removed:
        del r["memory_breakdown"]["other"]
    found, by = verdicts(rows(), removed)
    assert by[("c1", "memory_breakdown.other")].verdict == cmp.MISSING and cmp.exit_code(found) == 1


def test_another_machine_makes_timing_not_comparable_but_still_gates_exact_counters():
    other = rows(flops_per_step=2000, **{"env.cpu_model": "CPU B", "env.device_name": "CPU B"})
    found, by = verdicts(rows(), other)
    assert by[("c1", "step_time_ms_median")].verdict == cmp.NOT_COMPARABLE
    assert "cpu_model" in by[("c1", "step_time_ms_median")].note
    assert by[("c1", "flops_per_step")].verdict == cmp.REGRESSED and cmp.exit_code(found) == 1
    # Another torch: even the counters may legitimately move.
    _, by = verdicts(rows(), rows(**{"env.torch": "2.15.0"}))
    assert by[("c1", "flops_per_step")].verdict == cmp.NOT_COMPARABLE


def test_runs_of_one_cell_on_two_machines_are_never_timing_comparable():
    mixed = rows()
    mixed[0]["env"]["cpu_model"] = "CPU B"  # a folder resumed elsewhere, on both sides
    _, by = verdicts(mixed, mixed)
    assert by[(mixed[0]["cell_id"], "step_time_ms_median")].verdict == cmp.NOT_COMPARABLE


def test_baseline_file_round_trips_counters_once_and_samples_per_seed():
    cells = sides.cells_from_rows(rows())
    document = json.loads(json.dumps(baseline_document(cells, "m", "cmd")))
    entry = document["cells"]["c1"]
    assert entry["metrics"]["flops_per_step"] == 1000  # equal on every seed: stored once
    assert entry["metrics"]["step_time_ms_median"] == {str(s): STEP_MS[s] for s in (0, 1, 2)}
    back = sides.cells_from_baseline(document, "b.json")
    found = cmp.compare_cells(back, sides.cells_from_rows(rows()))
    assert {v.verdict for v in found} == {cmp.PASS}


def test_update_rewrites_only_what_moved():
    cells = sides.cells_from_rows(rows())
    document = json.loads(json.dumps(baseline_document(cells, "m", "cmd")))
    new = rows(**{"memory_breakdown.activations": 3100})
    for r in new:
        r["step_time_ms_median"] *= 1.02  # within its margin: keep the recorded samples
    updated, changes = updated_document(document, cells, sides.cells_from_rows(new), cmp.Policy())
    assert len(changes) == 2 and all("memory_breakdown.activations" in c for c in changes)
    for cell_id in ("c1", "c2"):
        before, after = document["cells"][cell_id]["metrics"], updated["cells"][cell_id]["metrics"]
        assert after["memory_breakdown.activations"] == 3100
        assert {k: v for k, v in after.items() if k != "memory_breakdown.activations"} == \
               {k: v for k, v in before.items() if k != "memory_breakdown.activations"}


def write_rows(folder, the_rows):
    folder.mkdir()
    (folder / "cells.jsonl").write_text("".join(json.dumps(r) + "\n" for r in the_rows))
    return folder


def test_cli_table_names_cell_and_metric_and_writes_json(tmp_path, capsys):
    base, new = write_rows(tmp_path / "a", rows()), write_rows(tmp_path / "b", rows(flops_per_step=1234))
    code = main(["compare", str(base), str(new), "--json", str(tmp_path / "v.json"),
                 "--markdown", str(tmp_path / "v.md")])
    out = capsys.readouterr().out
    assert code == 1
    line = next(l for l in out.splitlines() if "flops_per_step" in l and "`c2`" in l)
    assert "REGRESSED" in line and "1,234" in line
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["exit_code"] == 1 and data["counts"][cmp.REGRESSED] == 2
    assert (tmp_path / "v.md").read_text() in out


@pytest.mark.parametrize("make_args, message", [
    (lambda t: ["compare", str(t / "nowhere"), str(t / "a")], "no such file"),
    (lambda t: ["compare", str(t / "empty"), str(t / "a")], "no cells.jsonl"),
    (lambda t: ["compare", str(t / "bad.json"), str(t / "a")], "format"),
    (lambda t: ["compare", str(t / "a"), str(t / "a"), "--json", str(t / "no/dir/v.json")], "folder does not exist"),
    (lambda t: ["check", "ablations/ci.yaml", "--baseline", str(t / "nowhere.json")], "no such file"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, make_args, message):
    write_rows(tmp_path / "a", rows())
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text('{"cells": {}}')
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(make_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_cli_update_changes_only_the_lines_that_moved(tmp_path, capsys):
    path = tmp_path / "base.json"
    document = baseline_document(sides.cells_from_rows(rows()), "m", "cmd")
    path.write_text(json.dumps(document, indent=2) + "\n")
    before = path.read_text().splitlines()
    new = write_rows(tmp_path / "new", rows(cells=("c1", "c2", "c3"), flops_per_step=1500))
    assert main(["baseline", "update", str(path), str(new)]) == 0
    after = path.read_text().splitlines()
    removed = [line for line in before if line not in after]
    assert removed == ['        "flops_per_step": 1000,'] * 2
    assert main(["compare", str(path), str(new)]) == 0  # the updated baseline accepts the new rows
    assert main(["baseline", "update", str(path), str(new)]) == 0
    assert "unchanged" in capsys.readouterr().out and path.read_text().splitlines() == after


def test_check_against_a_baseline_of_another_torch_says_re_record_and_exits_2(tmp_path, capsys):
    path = tmp_path / "base.json"
    document = baseline_document(sides.cells_from_rows(rows(**{"env.torch": "2.13.0"})), "m", "trickbench baseline record m.yaml -o base.json")
    path.write_text(json.dumps(document))
    new = write_rows(tmp_path / "new", rows(flops_per_step=9999))  # would fail if it were compared
    assert main(["check", str(new), "--baseline", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch: 2.13.0 → 2.14.1" in err[0] and "trickbench baseline record m.yaml" in err[0]


def test_baseline_file_is_never_written_through_a_link(tmp_path):
    from bench.regression.baseline import write_baseline
    from bench.store.results import StoreError

    target = tmp_path / "elsewhere.json"
    target.write_text("keep")
    (tmp_path / "ci.json").symlink_to(target)
    with pytest.raises(StoreError):
        write_baseline({"cells": {}}, tmp_path / "ci.json")
    assert target.read_text() == "keep"


def test_a_cell_reads_the_same_in_compare_and_in_the_report():
    """Both name a cell by the axis values that differ from the baseline (the first row's cell)."""
    two_axes = [row(c, s, axes={"sam": None if c == "c1" else 0.05, "ema": None}) for s in (0, 1, 2) for c in ("c1", "c2")]
    compared = {c.cell_id: c.label for c in sides.cells_from_rows(two_axes).values()}
    reported = {s["cell_id"]: s["label"] for s in all_cell_stats(two_axes)}
    assert compared == reported == {"c1": "baseline", "c2": "sam=0.05"}
