"""`trickbench compare` on pytest-benchmark JSON written by pytest-benchmark itself (--benchmark-json)."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

import bench
from bench.cli.main import main

BASELINE = Path(bench.__file__).parent.parent / "baselines" / "ci-cpu.json"  # trickbench's own

BENCHMARKS = """
def test_sum(benchmark):
    benchmark(sum, range(200))

def test_sorted(benchmark):
    benchmark(sorted, list(range(200, 0, -1)))
"""


@pytest.fixture(scope="module")
def real_json(tmp_path_factory):
    """A --benchmark-json file from a real pytest-benchmark run (few rounds: only its format matters)."""
    folder = tmp_path_factory.mktemp("pb")
    (folder / "test_tiny.py").write_text(BENCHMARKS)
    done = subprocess.run([sys.executable, "-m", "pytest", "test_tiny.py", "-q", "-p", "no:cacheprovider",
                           "--benchmark-json=out.json", "--benchmark-min-rounds=3", "--benchmark-max-time=0.0001",
                           "--benchmark-warmup=off"], cwd=folder, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((folder / "out.json").read_text())


def scaled(data, factor, **cpu):
    """The run with every time multiplied by ``factor`` (as a slower build would), and ``cpu`` edits."""
    data = copy.deepcopy(data)
    for entry in data["benchmarks"]:
        stats = entry["stats"]
        for key in ("min", "max", "mean", "median", "q1", "q3"):
            stats[key] *= factor
        stats["data"] = [t * factor for t in stats["data"]]
    data["machine_info"]["cpu"].update(cpu)
    return data


def write_runs(folder, runs):
    folder.mkdir()
    for i, data in enumerate(runs):
        (folder / f"{i:04d}_run.json").write_text(json.dumps(data))
    return folder


def compare(tmp_path, base, new, *extra):
    out = tmp_path / "v.json"
    code = main(["compare", str(base), str(new), "--json", str(out), *extra])
    return code, json.loads(out.read_text())["verdicts"] if out.exists() else []


def test_one_file_a_side_is_one_run_so_timing_is_noise_with_a_note(tmp_path, real_json, capsys):
    (tmp_path / "a.json").write_text(json.dumps(real_json))
    (tmp_path / "b.json").write_text(json.dumps(scaled(real_json, 3.0)))  # 3x slower, yet one run
    code, verdicts = compare(tmp_path, tmp_path / "a.json", tmp_path / "b.json")
    assert code == 0
    assert {v["cell_id"] for v in verdicts} == {b["fullname"] for b in real_json["benchmarks"]}
    assert {(v["metric"], v["verdict"]) for v in verdicts} == {("benchmark_median_s", "~")}
    assert "one pytest-benchmark JSON is one run" in capsys.readouterr().err


def test_folders_of_runs_judge_a_slowdown_warning_only_unless_strict(tmp_path, real_json):
    base = write_runs(tmp_path / "base", [scaled(real_json, f) for f in (1.0, 1.02, 0.98)])
    same = write_runs(tmp_path / "same", [scaled(real_json, f) for f in (0.99, 1.01, 1.0)])
    slow = write_runs(tmp_path / "slow", [scaled(real_json, f) for f in (1.5, 1.53, 1.47)])
    code, verdicts = compare(tmp_path, base, same)
    assert code == 0 and {v["verdict"] for v in verdicts} == {"PASS"}
    code, verdicts = compare(tmp_path, base, slow)
    assert code == 0 and {v["verdict"] for v in verdicts} == {"REGRESSED"} and not any(v["fails"] for v in verdicts)
    code, verdicts = compare(tmp_path, base, slow, "--strict")
    assert code == 1 and all(v["fails"] for v in verdicts)


@pytest.mark.parametrize("cpu, named", [({"brand_raw": "Other CPU 9000"}, "Other CPU 9000"), ({"count": 64}, "cpu_cores")])
def test_another_machine_is_not_comparable(tmp_path, real_json, cpu, named):
    base = write_runs(tmp_path / "base", [scaled(real_json, f) for f in (1.0, 1.02, 0.98)])
    other = write_runs(tmp_path / "other", [scaled(real_json, f, **cpu) for f in (1.0, 1.02, 0.98)])
    _, verdicts = compare(tmp_path, base, other)
    assert {v["verdict"] for v in verdicts} == {"NOT COMPARABLE"}
    assert all(named in v["note"] for v in verdicts)


def test_python_version_differs_is_not_comparable(tmp_path, real_json):
    other = copy.deepcopy(real_json)
    other["machine_info"]["python_version"] = "3.99.0"
    base = write_runs(tmp_path / "base", [scaled(real_json, f) for f in (1.0, 1.02, 0.98)])
    new = write_runs(tmp_path / "new", [scaled(other, f) for f in (1.0, 1.02, 0.98)])
    _, verdicts = compare(tmp_path, base, new)
    assert {v["verdict"] for v in verdicts} == {"NOT COMPARABLE"} and "3.99.0" in verdicts[0]["note"]


@pytest.mark.parametrize("break_it, message", [
    (lambda d: d["benchmarks"][0].pop("stats"), "benchmarks[0]: stats"),
    (lambda d: d.update(benchmarks=[]), "benchmarks: empty"),
])
def test_malformed_json_is_one_line_exit_2(tmp_path, real_json, capsys, break_it, message):
    bad = copy.deepcopy(real_json)
    break_it(bad)
    (tmp_path / "ok.json").write_text(json.dumps(real_json))
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    code, _ = compare(tmp_path, tmp_path / "ok.json", tmp_path / "bad.json")
    err = capsys.readouterr().err
    assert code == 2 and message in err and "bad.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "v.json").exists()


def test_pytest_benchmark_against_a_trickbench_baseline_is_refused(tmp_path, real_json, capsys):
    (tmp_path / "pb.json").write_text(json.dumps(real_json))
    code, _ = compare(tmp_path, BASELINE, tmp_path / "pb.json")
    err = capsys.readouterr().err
    assert code == 2 and "compare only with pytest-benchmark" in err
