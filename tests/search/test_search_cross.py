"""compress search with a teacher of another family (MPNet) than its students: the space names the student, whose
depth the space's layers are checked against before the study opens; without one, one line. compress auto, whose
footprints are cut from the teacher's own layers, refuses such a teacher in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_search, save_tiny_bert

from compress.cli.main import main


def cli_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def student(tiny_root) -> Path:
    return save_tiny_bert(tiny_root / "search-cross-student", layers=2)


@pytest.mark.parametrize(("space", "message"), [
    ({"layers": [1]}, "a student is built from the layers of a BERT-family model, not a mpnet; set one in the space, "
                      "e.g. student: minilm-l6"),
    ({"layers": [1, 3], "student": "STUDENT"}, "space: layers: 3 is more than the student's 2 layers"),
    ({"layers": [1], "student": "STUDENT", "max_length": [32, 256]},
     "space: max_length: 256 is more than the student's 128 positions"),
])
def test_a_space_the_cross_family_teacher_cannot_run_is_one_line(space, message, tiny_mpnet, student, tiny_data,
                                                                 workdir, capsys):
    space = {k: str(student) if v == "STUDENT" else v for k, v in space.items()}
    err = cli_error(capsys, "search", "--teacher", tiny_mpnet, "--data", tiny_data, "--space", json.dumps(space))
    assert message in err, err
    assert list(workdir.iterdir()) == []  # no study, no store


def test_auto_refuses_a_teacher_it_cannot_cut(tiny_mpnet, tiny_data, workdir, capsys):
    err = cli_error(capsys, "auto", "--teacher", tiny_mpnet, "--data", tiny_data, "--min_retention", "0.9")
    assert "compress auto cuts its students from the teacher's layers, which a mpnet is not made of" in err, err
    assert list(workdir.iterdir()) == []


def test_a_search_distils_the_spaces_student_from_an_mpnet_teacher(tiny_mpnet, student, tiny_data, tmp_path):
    import optuna
    from mlflow import MlflowClient

    tracking, storage = f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db"
    space = {"student": str(student), "layers": [1, 2], "epochs": 1, "teacher_epochs": 1, "latency_reps": 1,
             "max_train": 64, "batch_size": 32, "teacher_cache": str(tmp_path / "cache")}
    run_search(teacher=str(tiny_mpnet), data=str(tiny_data), space=space, trials=2, study="cross",
               output=str(tmp_path / "out"), tracking=tracking, storage=storage)
    trials = optuna.load_study(study_name="cross", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    # the head-less MPNet was fine-tuned once for the study, and every trial learnt from that copy
    (teacher,) = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("mpnet-")]
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("compress")
    distills = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("compress.command") == "distill"]
    assert len(distills) == 2
    for run in distills:
        assert run.data.params["teacher"] == str(teacher) and run.data.params["student"] == str(student)
        # the student is the BERT's own 1 or 2 layers, not the teacher's 2 layers of 48
        assert run.data.metrics["student_params"] < run.data.metrics["teacher_params"]
