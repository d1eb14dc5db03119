"""Every YAML under experiments/ parses against the command its first line names, so shipped configs never rot."""

import contextlib
import io
import re
from pathlib import Path

import pytest
import yaml

from compress.cli.main import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted({p.relative_to(ROOT).as_posix() for ext in ("yaml", "yml")
                  for p in ROOT.glob(f"experiments/**/*.{ext}")})
HEADER = re.compile(r"# compress (\S+) --config (\S+)")


def test_experiments_ship_configs() -> None:
    assert CONFIGS, "no YAML under experiments/"
    assert "experiments/distill_bbc_news.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS)
def test_config_parses_against_its_command(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the header's path is relative to the repository root
    text = (ROOT / path).read_text()
    match = HEADER.fullmatch(text.splitlines()[0].strip())
    assert match, f"{path}: the first line must be '# compress <command> --config {path}'"
    command, config = match.groups()
    assert config == path, f"{path}: its header names {config}"
    assert command in COMMANDS, f"{path}: unknown command {command!r} (known: {', '.join(COMMANDS)})"

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        main([command, "--config", config, "--print_config"])
    assert info.value.code in (0, None), err.getvalue()
    printed = yaml.safe_load(out.getvalue())
    given = yaml.safe_load(text)
    assert isinstance(given, dict) and given, f"{path} sets nothing"
    for key, value in given.items():
        assert key in printed, f"{path}: {key} is not a flag of compress {command}"
        assert printed[key] == value, f"{path}: {key} = {value!r} was read as {printed[key]!r}"


def test_bench_chain_tiny_runs_all_three_recipes_per_seed_and_times_them_together() -> None:
    """experiments/bench_chain.py --tiny --seeds 1,2: prune, prune then share, share, each a real compress run on a
    tiny parent, once per seed, and one interleaved timing of the parent and all six models."""
    import json
    import os
    import statistics
    import subprocess
    import sys

    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_chain.py"), "--tiny", "--seeds", "1,2"],
                          capture_output=True, text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ")][-4:] == [
        "parent", "prune", "prune+share", "share"]
    written = Path(re.search(r"written: (\S+)", done.stderr).group(1))
    result = json.loads(written.read_text())
    assert set(result["runs"]) == {"1", "2"}
    for seed, runs in result["runs"].items():
        params = {name: row["student_params"] for name, row in runs.items()}
        # sharing the pruned model shrinks it again; half the heads and neurons go either way
        assert params["prune+share"] < params["prune"] < result["parent_row"]["params"]
        assert params["share"] < result["parent_row"]["params"]
        folder = written.parent / f"seed-{seed}"
        assert json.loads((folder / "prune+share" / "config.json").read_text())["model_type"] == "compress_bert"
        assert json.loads((folder / "share" / "config.json").read_text())["model_type"] == "albert"
    assert set(result["latency_p50_ms"]) == {"parent"} | {f"{name}@{seed}" for seed in ("1", "2")
                                                          for name in ("prune", "prune+share", "share")}
    for name, row in result["rows"].items():  # the summary is the mean and sd of the per-seed runs
        scores = [result["runs"][seed][name]["student_score"] for seed in ("1", "2")]
        assert row["scores"] == scores
        assert row["score"] == statistics.mean(scores) and row["score_sd"] == statistics.stdev(scores)
        assert row["p50_ms"] == statistics.mean(result["latency_p50_ms"][f"{name}@{seed}"] for seed in ("1", "2"))


def test_bench_width_tiny_cuts_each_row_further_and_times_them_with_the_teacher() -> None:
    """experiments/bench_width.py --tiny: a distilled student, then vocab, heads/FFN and two hidden cuts of it (each a
    real compress run), the whole chain exported to int8 ONNX, and one interleaved timing of all of them."""
    import json
    import os
    import subprocess
    import sys

    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_width.py"), "--tiny"],
                          capture_output=True, text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ")][-8:] == [
        "teacher", "student", "+ vocab", "+ vocab min", "+ heads/FFN", "+ hidden 0.25", "+ hidden 0.5", "chain int8"]
    written = Path(re.search(r"written: (\S+)", done.stderr).group(1))
    result = json.loads(written.read_text())
    params = [result["sizes"][name]["params"] for name in ("teacher", "student", "+ vocab", "+ heads/FFN",
                                                           "+ hidden 0.25", "+ hidden 0.5")]
    assert params == sorted(params, reverse=True) and len(set(params)) == len(params)
    runs = result["runs"]["42"]
    # the tiny teacher is 64 wide; the vocabulary loses exactly the 4 words the rows never use, 64 values each, and
    # every word of the synthetic rows occurs more than --vocab-min-count times, so the min-count cut is the same
    assert params[1] - params[2] == 4 * 64 and runs["+ vocab"]["unk_rate"] == 0.0
    assert result["sizes"]["+ vocab min"]["params"] == params[2]
    assert [runs[name]["hidden_size"] for name in ("+ heads/FFN", "+ hidden 0.25", "+ hidden 0.5")] == [64, 48, 32]
    assert runs["chain int8"]["parity_max_abs_diff"] <= 1e-4 and "int8_score" in runs["chain int8"]
    assert set(result["latency"]) == {"teacher", "student", "+ vocab", "+ vocab min", "+ heads/FFN",
                                      "+ hidden 0.25", "+ hidden 0.5", "chain onnx", "chain int8"}


def test_bench_distill_tiny_runs_every_row_against_its_own_teacher(tmp_path: Path) -> None:
    """experiments/bench_distill.py --tiny: labels only, the plain loop, compress distill, + --unlabeled, + --augment,
    and the second-family teacher (a tiny MPNet) with and without the unlabelled text, each scored against its own
    teacher and against labels only."""
    import json
    import math
    import os
    import subprocess
    import sys

    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_distill.py"), "--tiny", "--json",
                           str(tmp_path / "bench.json")], capture_output=True, text=True, env=env, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = result["rows"]
    assert list(rows) == ["no KD (labels only)", "plain KD loop", "compress distill", "+ --unlabeled",
                          "+ --augment 1", "teacher2: compress distill", "teacher2: + --unlabeled"]
    assert result["unlabeled_rows"] == 256
    base = rows["no KD (labels only)"]["score"]
    for name, row in rows.items():
        assert 0 < row["score"] <= 1 and math.isfinite(row["seconds"]), name
        assert row["retention"] == row["score"] / row["teacher_score"]
        assert row["gain_over_labels_only"] == row["score"] - base
    # the MPNet teacher is another model than the first: its rows are measured against it
    assert rows["teacher2: compress distill"]["teacher_score"] == rows["teacher2: + --unlabeled"]["teacher_score"]
    assert rows["compress distill"]["teacher_score"] == rows["+ --unlabeled"]["teacher_score"]
    assert "fewer parameters than mpnet" in done.stdout


def test_bench_distill_rows_trains_only_the_rows_named(tmp_path: Path) -> None:
    """--rows: the rows named are trained and printed, the others are neither; a row it does not have is refused."""
    import json
    import os
    import subprocess
    import sys

    env = os.environ | {"OMP_NUM_THREADS": "1"}
    script = str(ROOT / "experiments" / "bench_distill.py")
    done = subprocess.run([sys.executable, script, "--tiny", "--unlabeled_rows", "0", "--json",
                           str(tmp_path / "bench.json"), "--rows", "no KD (labels only)", "compress distill"],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(json.loads((tmp_path / "bench.json").read_text())["rows"]) == ["no KD (labels only)",
                                                                               "compress distill"]
    assert "plain KD loop" not in done.stdout
    refused = subprocess.run([sys.executable, script, "--tiny", "--rows", "+ --augment 9"],
                             capture_output=True, text=True, env=env, timeout=600, check=False)
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines()[-1].startswith("--rows: no row named '+ --augment 9' with these flags")


def test_bench_distill_keeps_the_rows_another_run_sharing_its_workdir_wrote(tmp_path: Path) -> None:
    """Two bench_distill runs on one --workdir (one per core): each keeps its result into the file as it is on disk,
    so the run that read the file first does not drop the other's row, and a cut-short row resumes its checkpoints."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bench_distill", ROOT / "experiments" / "bench_distill.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "results-L3-4000.json"
    first, second = bench.read_results(results), bench.read_results(results)  # both read before either wrote
    bench.keep_result(results, second, "row B", {"score": 0.5})
    bench.keep_result(results, first, "row A", {"score": 0.75})
    assert json.loads(results.read_text())["rows"] == {"row B": {"score": 0.5}, "row A": {"score": 0.75}}
    assert first["rows"] == {"row B": {"score": 0.5}, "row A": {"score": 0.75}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results-L3-4000.json", "results-L3-4000.json.lock"]

    out = tmp_path / "student" / "seed42"
    assert (bench.resumable(out).resume, bench.resumable(out).overwrite) == (False, True)
    (tmp_path / "student" / "seed42.partial").mkdir(parents=True)
    assert bench.resumable(out).resume


def test_bench_auto_tiny_runs_both_budgets_from_the_teachers_own_numbers() -> None:
    """experiments/bench_auto.py --tiny: the teacher timed and weighed, then one compress auto study per budget (1/8
    of its p50; and 1/20 of its MB too), each met with its winner measured beside the teacher, or its closest trial
    and the constraint that bound named."""
    import json
    import os
    import subprocess
    import sys

    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_auto.py"), "--tiny"],
                          capture_output=True, text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line.split("|")[1].strip() for line in done.stdout.splitlines()
            if line.startswith("| latency")] == ["latency", "latency+mb"]
    written = Path(re.search(r"written: (\S+)", done.stderr).group(1))
    result = json.loads(written.read_text())
    base, budgets = result["baseline"], result["budgets"]
    assert budgets["latency"]["budget"]["max_latency_ms"] == base["p50_ms"] / 8
    assert budgets["latency"]["budget"]["max_mb"] is None
    assert budgets["latency+mb"]["budget"]["max_mb"] == base["mb"] / 20
    for name, row in budgets.items():
        assert row["tally"]["finished"] >= 1 and Path(row["report"]).is_file(), name
        if row["met"]:
            winner = row["winner"]
            assert winner["latency_ms"] <= row["budget"]["max_latency_ms"] and winner["retention"] >= 0.97
            assert Path(winner["folder"], "model.int8.onnx").is_file()
        else:  # the closest trial and what bound, in one line
            assert " bound " in row["verdict"] and "the closest is trial" in row["verdict"], row["verdict"]
