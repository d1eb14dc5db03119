"""compress auto: the budget's flags and constraints, and studies on a tiny random BERT (a generous budget met and
exported, a trial over the size cap pruned before any training, resume, an impossible budget said in one line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import cli_error, error_lines, mlflow_runs, run_main

from compress.infra.errors import CompressError
from compress.search.budget import Budget, binding, make_budget, meets, parse_duration, parse_shape, violations

# one epoch on 64 rows, no recovery epochs: a trained trial takes a few seconds
SPACE = {"layers": [1, 3], "heads": [0.0, 0.5], "ffn": 0.0, "hidden": 0.0, "vocab": False, "groups": None,
         "epochs": 1, "recover_epochs": 0, "max_train": 64, "batch_size": 32, "importance_batches": 1}
CAP = 20_000  # parameters: a 1-layer student of the tiny teacher has 14,754, a 3-layer one 30,202


def auto_args(teacher: Path, data: Path, root: Path, *extra) -> list:
    return ["auto", "--teacher", teacher, "--data", data, "--latency_shape", "1x16", "--latency_reps", "3",
            "--tracking", f"sqlite:///{root}/mlruns/mlflow.db", "--storage", f"sqlite:///{root}/mlruns/optuna.db",
            "--output", root / "out", *extra]


def trials_of(root: Path, study: str):
    import optuna

    return optuna.load_study(study_name=study, storage=f"sqlite:///{root}/mlruns/optuna.db").get_trials()


# --- the budget, no model ---------------------------------------------------------------------------------------

def test_budget_flags_and_constraints():
    assert parse_shape("1x128") == (1, 128) and parse_shape(" 32 X 64 ") == (32, 64)
    assert parse_duration("2h") == 7200 and parse_duration("1h30m") == 5400 and parse_duration("45s") == 45
    assert parse_duration(None) is None
    budget = make_budget(max_latency_ms=10, latency_shape="1x128", min_retention=0.97, min_score=None,
                         max_params=None, max_mb=4.5, runtime="auto").with_teacher(0.9775, "accuracy")
    assert budget.floor == pytest.approx(0.97 * 0.9775)
    ok = {"student_score": 0.96, "student_mb": 4.0, "latency_ms": 9.0}
    assert meets(budget, ok) and not meets(budget, {"student_mb": 4.0, "latency_ms": 9.0})  # no score yet: unmet
    slow = ok | {"latency_ms": 12.0}
    assert violations(budget, slow) == pytest.approx({"latency": 0.2, "mb": -1 / 9, "score": (0.948175 - 0.96)
                                                      / 0.948175})
    rows = [{"violations": violations(budget, slow)}, {"violations": violations(budget, ok | {"student_mb": 9.0})},
            {"violations": violations(budget, slow | {"latency_ms": 11.0})}]
    name, closest = binding(budget, rows)
    assert name == "latency" and closest is rows[2]  # two trials broke the latency cap; the third is 10% over


def test_the_floor_pruner_stops_a_trial_below_the_floor_and_the_median():
    import optuna
    from optuna.trial import TrialState, create_trial

    from compress.search.budget import floor_pruner

    def study_with(*scores):
        study = optuna.create_study(pruner=floor_pruner(0.8))  # minimising MB: the scores are not the objective
        for v in scores:
            study.add_trial(create_trial(state=TrialState.COMPLETE, value=1.0, intermediate_values={0: v}))
        return study

    def stopped(study, score):
        trial = study.ask()
        trial.report(score, 0)
        return trial.should_prune()

    assert stopped(study_with(0.9, 0.85), 0.7)  # below the floor and the others' median
    assert not stopped(study_with(0.9, 0.85), 0.8)  # at the floor: it can still win
    assert not stopped(study_with(0.5, 0.6), 0.7)  # below the floor, but ahead of the others at this checkpoint
    assert not stopped(study_with(0.9), 0.1)  # one other trial is too few to judge by


def test_unmet_as_shipped_names_the_constraint_and_the_trial():
    from compress.search.auto import _unmet
    from compress.search.verdict import Judged, Shipped

    budget = make_budget(max_latency_ms=None, latency_shape="1x8", min_retention=0.97, min_score=None,
                         max_params=None, max_mb=1.0, runtime="onnx-int8").with_teacher(0.9, "accuracy")
    trial = Judged(3, "complete", {"student_score": 0.89, "student_mb": 0.5}, {}, "distill L2 T=2", "onnx-int8",
                   "", "somewhere")
    shipped = Shipped(trial, "out/model", {"onnx-int8": {"student_score": 0.80, "student_mb": 0.5}}, {}, None, {})
    line = _unmet(budget, [trial], [shipped])
    assert line.startswith("score bound as shipped (--min_retention 0.97): the closest is trial 3 (distill L2 T=2)")
    assert "accuracy 0.8000 < 0.8730" in line and "\n" not in line


@pytest.mark.parametrize("flags, message", [
    (["--max_latency_ms", "-1", "--min_retention", "0.9"], "--max_latency_ms -1: must be > 0"),
    (["--max_latency_ms", "0", "--min_retention", "0.9"], "--max_latency_ms 0: must be > 0"),
    (["--max_mb", "0", "--min_retention", "0.9"], "--max_mb 0: must be > 0"),
    (["--max_params", "-5", "--min_retention", "0.9"], "--max_params -5: must be at least 1"),
    (["--min_retention", "1.5"], "--min_retention 1.5: must be in (0, 1]"),
    (["--min_retention", "0"], "--min_retention 0: must be in (0, 1]"),
    (["--min_score", "-0.2"], "--min_score -0.2: must be in (0, 1]"),
    (["--max_latency_ms", "10"], "give --min_retention"),
    (["--min_retention", "0.9", "--latency_shape", "1x"], "--latency_shape 1x: give BATCHxTOKENS"),
    (["--min_retention", "0.9", "--latency_shape", "0x128"], "--latency_shape 0x128: give BATCHxTOKENS"),
    (["--min_retention", "0.9", "--latency_shape", "1x512"], "--latency_shape 1x512: the teacher takes at most 128"),
    (["--min_retention", "0.9", "--time_budget", "2"], "--time_budget 2: give a duration with a unit"),
    (["--min_retention", "0.9", "--time_budget", "0h"], "--time_budget 0h: must be longer than 0"),
    (["--min_retention", "0.9", "--runtime", "gpu"], "--runtime gpu: use auto, onnx-int8, onnx, torch"),
    (["--min_retention", "0.9", "--trials", "0"], "--trials 0: must be at least 1"),
    (["--min_retention", "0.9", "--max_length", "256"], "max_length: 256 is more than the teacher's 128 positions"),
    (["--min_retention", "0.9", "--space", "{heads: [1.5]}"], "space: heads: 1.5 is out of range"),
    (["--min_retention", "0.9", "--space", "{runtime: torch}"], "runtime is compress auto's own flag"),
    (["--min_retention", "0.9", "--space", "{layers: [9]}"], "space: layers: 9 is more than the teacher's 4 layers"),
    (["--min_retention", "0.9", "--space", "{student: minilm-l6}"], "space: student: compress auto cuts its students"),
])
def test_bad_budgets_get_one_line_before_any_work(tiny_teacher, tiny_data, workdir, capsys, flags, message):
    line = cli_error(capsys, "auto", "--teacher", tiny_teacher, "--data", tiny_data, *flags)
    assert message in line, line
    assert not (workdir / "mlruns").exists() and not (workdir / "outputs").exists()


# --- studies on the tiny teacher --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def generous(tmp_path_factory, tiny_teacher, tiny_data):
    """4 trials of 1- or 3-layer students under a parameter cap only the 1-layer ones meet, every runtime measured;
    run_training watched, so a trial over the cap is seen to train nothing."""
    from compress.engine import run

    trained: list[str] = []
    real = run.run_training

    def watched(plan, models, task, cfg, tracking, hooks=None):
        trained.append(hooks.tags.get("optuna.trial"))
        return real(plan, models, task, cfg, tracking, hooks)

    root = tmp_path_factory.mktemp("auto")
    space = SPACE | {"teacher_cache": str(root / "teachers")}  # a logits-only trial caches the teacher's logits
    args = auto_args(tiny_teacher, tiny_data, root, "--min_retention", "0.9", "--max_params", CAP,
                     "--max_latency_ms", "1000", "--trials", "4", "--study", "tiny", "--space", json.dumps(space))
    run.run_training = watched
    try:
        code, _, err = run_main(args)
    finally:
        run.run_training = real
    return {"root": root, "args": args, "code": code, "err": err, "trained": trained}


def test_a_generous_budget_is_met_and_the_winner_exported(generous):
    assert generous["code"] == 0, generous["err"][-3000:]
    out = generous["root"] / "out"
    for name in ("model.safetensors", "model.onnx", "model.int8.onnx", "README.md", "config.json"):
        assert (out / "model" / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "## Winner: trial" in report and "| p50 ms |" in report and "## Pareto front" in report
    assert "## Runner-up" in report and "![Pareto front](pareto_front.png)" in report
    assert (out / "pareto_front.png").is_file()
    trials = trials_of(generous["root"], "tiny")
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert complete and all(t.user_attrs["student_params"] <= CAP for t in complete)
    for t in complete:  # the untrained model built for the caps is the model the steps trained
        assert t.user_attrs["shape_params"] == t.user_attrs["student_params"]
        assert set(t.constraints) == {"params", "latency", "score"}
        assert t.user_attrs["runtime"] in ("onnx-int8", "onnx", "torch")
    # one parent run, the trials nested under it, report.md and the outcome on it
    client, runs = mlflow_runs(f"sqlite:///{generous['root']}/mlruns/mlflow.db")
    parents = [r for r in runs if r.data.tags.get("compress.command") == "auto"]
    assert len(parents) == 1 and parents[0].data.tags["compress.budget_met"] == "true"
    parent = parents[0].info.run_id
    assert "winner_latency_ms" in parents[0].data.metrics
    assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]) == len(complete)
    assert "report.md" in [a.path for a in client.list_artifacts(parent)]


def test_no_training_starts_for_a_trial_over_the_size_cap(generous):
    trials = trials_of(generous["root"], "tiny")
    over = [t for t in trials if t.state.name == "PRUNED" and "skipped" in t.user_attrs]
    assert over, [t.params for t in trials]  # the sampler drew a 3-layer student
    for t in over:
        assert t.params["layers"] == 3 and t.user_attrs["student_params"] > CAP
        assert "params" in t.constraints and t.constraints["params"] > 0
        assert str(t.number) not in generous["trained"]
        assert not (generous["root"] / "out" / f"trial-{t.number:03d}").exists()
    assert set(generous["trained"]) == {str(t.number) for t in trials if t.state.name == "COMPLETE"}


def test_resume_adds_trials_to_the_same_study(generous):
    before = trials_of(generous["root"], "tiny")
    args = [a for a in generous["args"]]
    args[args.index("--trials") + 1] = "1"
    code, _, err = run_main(args)
    assert code == 0, err[-3000:]
    assert "adding to its 4 earlier trial(s)" in err
    after = trials_of(generous["root"], "tiny")
    assert len(after) == len(before) + 1
    _, runs = mlflow_runs(f"sqlite:///{generous['root']}/mlruns/mlflow.db")
    assert len([r for r in runs if r.data.tags.get("compress.command") == "auto"]) == 1  # the same parent run


def test_an_impossible_budget_names_what_bound_and_still_reports(tiny_teacher, tiny_data, tmp_path, capsys):
    space = SPACE | {"teacher_cache": str(tmp_path / "teachers")}
    args = auto_args(tiny_teacher, tiny_data, tmp_path, "--min_retention", "0.9", "--max_params", "1000",
                     "--runtime", "torch", "--trials", "2", "--space", json.dumps(space))
    code, _, err = run_main(args)
    assert code == 1
    lines = error_lines(err)
    # the last line, and the only error (Optuna's log handler may still hold an earlier test's closed stream)
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0]
    assert "no trial meets the budget: params bound (2 of 2 trials broke it: --max_params 1000)" in lines[0]
    assert "the closest is trial" in lines[0] and "report.md" in lines[0]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "**Outcome**: params bound" in report and "Closest to the budget without meeting it" in report
    assert not (tmp_path / "out" / "model").exists()
    assert not list((tmp_path / "out").glob("trial-*"))  # nothing trained


def test_budget_refuses_a_space_without_an_accuracy_floor():
    with pytest.raises(CompressError, match="give --min_retention"):
        make_budget(max_latency_ms=None, latency_shape="1x8", min_retention=None, min_score=None, max_params=5,
                    max_mb=None, runtime="torch")
    assert Budget(latency_shape=(1, 8), runtimes=("torch",), min_score=0.8).floor == 0.8


def test_a_spent_time_budget_starts_no_trial_and_still_reports(tiny_teacher, tiny_data, tmp_path):
    """--time_budget counts from the start: spent on the checks and the teacher's score, no trial starts."""
    args = auto_args(tiny_teacher, tiny_data, tmp_path, "--min_retention", "0.9", "--runtime", "torch", "--trials",
                     "3", "--time_budget", "1s", "--space", json.dumps(SPACE))
    code, _, err = run_main(args)
    assert code == 1 and error_lines(err)[-1].endswith(
        f"no trial finished within --time_budget 1s (report: {tmp_path / 'out' / 'report.md'})")
    assert trials_of(tmp_path, "auto-teacher-data") == []
    assert "**Outcome**: no trial finished within --time_budget 1s" in (tmp_path / "out" / "report.md").read_text()
