"""compress search draws distill's unlabelled text on or off ([null, PATH]) and its augmented copies (counts): the
space checks them before a study opens, and each trial's distill run learns from what its trial drew."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_rows, run_search

from compress.infra.errors import CompressError
from compress.search.space import describe, parse_space, plan, step_flags


@pytest.fixture(scope="module")
def flags():
    return step_flags()


@pytest.fixture
def texts(tmp_path: Path) -> Path:
    path = tmp_path / "more.txt"
    path.write_text("\n".join(text for text, _ in make_rows(40, seed=11)) + "\n")
    return path


def test_a_space_draws_unlabeled_text_and_augment_counts(flags, texts: Path) -> None:
    dims = parse_space({"layers": [1, 2], "unlabeled": [None, str(texts)], "augment": {"low": 0, "high": 3}}, flags)
    assert dims["unlabeled"].kind == "choice" and dims["unlabeled"].choices == [None, str(texts)]
    assert dims["augment"].kind == "int"
    (distill,) = plan({"layers": 2, "unlabeled": str(texts), "augment": 2, "heads": 0}, flags)
    assert distill == ("distill", {"layers": 2, "unlabeled": str(texts), "augment": 2})
    assert describe(*distill, flags) == "distill L2 T=2 +unlabeled +augment2"
    off = plan({"layers": 2, "unlabeled": None, "augment": 0}, flags)[0]
    assert describe(*off, flags) == "distill L2 T=2"
    # prune and share have no such flags: a trial's other steps never get them
    steps = plan({"layers": 1, "unlabeled": str(texts), "augment": 1, "heads": 0.5}, flags)
    assert [s for s, _ in steps] == ["distill", "prune"] and not {"unlabeled", "augment"} & set(steps[1][1])


@pytest.mark.parametrize(("space", "message"), [
    ({"layers": 1, "unlabeled": [None, "nope.txt"]}, "space: unlabeled: 'nope.txt' is not a file; give the file"),
    ({"layers": 1, "unlabeled": [False, True]}, "space: unlabeled: False is not a file"),
    ({"layers": 1, "augment": [0, -1]}, "space: augment: -1 is out of range; augment must be at least 0"),
    ({"heads": 0.5, "augment": [0, 2]}, "space: augment adds rows to distill's training, and no trial distils"),
])
def test_what_no_trial_could_use_is_refused_before_the_study(flags, space: dict, message: str) -> None:
    with pytest.raises(CompressError) as info:
        parse_space(space, flags)
    assert str(info.value).startswith(message), str(info.value)


def test_each_trial_distils_with_what_it_drew(tmp_path: Path, tiny_teacher: Path, tiny_data: Path,
                                             texts: Path) -> None:
    from mlflow import MlflowClient

    tracking, storage = f"sqlite:///{tmp_path}/mlruns/mlflow.db", f"sqlite:///{tmp_path}/mlruns/optuna.db"
    space = {"layers": [1], "unlabeled": [None, str(texts)], "augment": [0, 1], "alpha_hidden": 0.0, "epochs": 1,
             "latency_reps": 1, "batch_size": 32, "teacher_cache": str(tmp_path / "teachers")}
    result = run_search(teacher=str(tiny_teacher), data=str(tiny_data), space=space, objectives="score,params",
                        trials=3, sampler="random", sampler_seed=1, study="soft", output=str(tmp_path / "out"),
                        tracking=tracking, storage=storage)
    import optuna

    trials = optuna.load_study(study_name="soft", storage=storage).get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 and len(result.rows) == 3
    drawn = {(t.params["unlabeled"] is not None, t.params["augment"]) for t in trials}
    assert len(drawn) >= 2 and {on for on, _ in drawn} == {False, True}  # this seed draws both ways
    client = MlflowClient(tracking)
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        (step,) = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        params = step.data.params
        assert params["unlabeled"] == (trial.params["unlabeled"] or "") and params["augment"] == str(
            trial.params["augment"])
        assert ("unlabeled_rows" in params) == (trial.params["unlabeled"] is not None)
        assert ("augment_rows" in params) == (trial.params["augment"] > 0)
        assert ("+unlabeled" in run.info.run_name) == (trial.params["unlabeled"] is not None)
