"""What a run leaves in MLflow for its review in the UI: the experiment marked as model training with compress's
runs-table view, the task's train and dev rows as dataset inputs, and the model as a logged model (external: its
weights are the run's model artifact, uploaded once) whose metrics attach to it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from compress.data.tasks import TaskData
from compress.infra.tracking import (EXPERIMENT_KIND, MODEL_TRAINING, REVIEW_METRICS, VIEW_TAG, experiment_link,
                                     log_final, log_task_data, tag_experiment, task_dataset)

METRICS = {"student_score": 0.9, "teacher_score": 0.95, "retention": 0.9 / 0.95, "student_params": 1e6,
           "student_mb": 4.0, "latency_ms": 2.5, "speedup": 3.0}


def task(folder: Path | None = None, dev_label: int = 0) -> TaskData:
    return TaskData(name="tiny", train_texts=[("good film",), ("bad film",), ("fine",)], train_labels=[1, 0, 1],
                    dev_texts=[("great",), ("awful",)], dev_labels=[1, dev_label], label_names=["neg", "pos"],
                    metric="accuracy", fingerprint="f", flags={"data": str(folder) if folder else ""})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module: creating MLflow's tables takes seconds."""
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db")


@pytest.fixture
def run(store, tmp_path):
    """A run in its own experiment, as a Lightning logger shows it to tracking (its client and run id)."""
    exp = store.create_experiment(tmp_path.name, artifact_location=(tmp_path / "artifacts").as_uri())
    return SimpleNamespace(experiment=store, run_id=store.create_run(exp).info.run_id, experiment_id=exp)


def test_the_experiment_is_model_training_and_opens_on_the_review_metrics(run):
    client, exp = run.experiment, run.experiment_id
    tag_experiment(client, exp)
    tags = client.get_experiment(exp).tags
    assert tags[EXPERIMENT_KIND] == MODEL_TRAINING
    view = json.loads(tags[VIEW_TAG])
    assert view["selectedColumns"][:len(REVIEW_METRICS)] == [f"metrics.`{m}`" for m in REVIEW_METRICS]
    assert view["columnOrder"] == view["selectedColumns"]
    link = experiment_link("http://h:1", exp, tags)
    assert link == f"http://h:1/#/experiments/{exp}/runs?workflowType=machine_learning&viewStateShareKey=compress"
    # an experiment without the view (an older compress made it) is not sent to a view the UI cannot find
    assert experiment_link("http://h:1", exp, {}) == f"http://h:1/#/experiments/{exp}/runs?workflowType=machine_learning"


def test_a_kind_the_owner_chose_is_kept(run):
    client, exp = run.experiment, run.experiment_id
    client.set_experiment_tag(exp, EXPERIMENT_KIND, "genai_development")
    tag_experiment(client, exp)
    assert client.get_experiment(exp).tags[EXPERIMENT_KIND] == "genai_development"


def test_train_and_dev_are_the_runs_datasets_once_each(run, tmp_path):
    data = task(tmp_path)
    log_task_data(run, data)
    log_task_data(run, data)  # --resume logs them again
    inputs = run.experiment.get_run(run.run_id).inputs.dataset_inputs
    by_context = {i.tags[0].value: i.dataset for i in inputs}
    assert len(inputs) == 2 and set(by_context) == {"training", "eval"}
    train, dev = by_context["training"], by_context["eval"]
    assert (train.name, dev.name) == ("tiny train", "tiny dev") and train.digest != dev.digest
    assert json.loads(train.profile) == {"num_rows": 3, "num_labels": 2}
    assert json.loads(dev.source) == {"uri": str(tmp_path.resolve())} and dev.source_type == "local"
    assert [c["name"] for c in json.loads(train.schema)["mlflow_colspec"]] == ["text", "label"]
    # the digest follows the rows: the same rows give the same digest, another label another
    assert task_dataset(task(tmp_path), "dev").digest == dev.digest != task_dataset(task(dev_label=1), "dev").digest


def test_the_model_is_a_logged_model_with_the_metrics_and_its_weights_uploaded_once(run, tmp_path):
    client = run.experiment
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"w" * 1000)
    data = task()
    log_task_data(run, data)
    model_id = log_final(run, METRICS, artifact_dir=str(folder), model=("out.v2/student", "distill"), task=data)

    model = client.get_logged_model(model_id)
    assert (model.name, model.model_type, model.source_run_id, str(model.status)) == (
        "out-v2-student", "distill", run.run_id, "READY")  # '/' and '.' are refused in a model's name
    assert model.tags["mlflow.model.isExternal"] == "true"
    assert model.tags["compress.weights"] == f"runs:/{run.run_id}/model"
    attached = {m.key: m for m in model.metrics}
    assert {k: m.value for k, m in attached.items()} == pytest.approx(METRICS)
    dev = task_dataset(data, "dev")
    assert (attached["student_score"].dataset_name, attached["student_score"].dataset_digest) == (dev.name, dev.digest)
    assert attached["student_mb"].dataset_name is None  # a size depends on no data

    logged = client.get_run(run.run_id)
    assert logged.data.metrics == pytest.approx(METRICS)
    assert [o.model_id for o in logged.outputs.model_outputs] == [model_id]
    # the weights live once, under the run's model/ (export --run reads them there), not again under the model
    assert [a.path for a in client.list_artifacts(run.run_id, "model")] == ["model/model.safetensors"]
    assert not list((tmp_path / "artifacts").glob(f"**/{model_id}/**/*.safetensors"))

    # a resumed run that logs its end again keeps its one model
    assert log_final(run, METRICS, model=("out.v2/student", "distill"), task=data) == model_id
    assert len(client.search_logged_models([run.experiment_id])) == 1


def test_a_ddp_rank_other_than_0_logs_nothing():
    """Lightning gives ranks other than 0 a stand-in experiment whose methods return None, with the run id on
    --resume."""
    stand_in = SimpleNamespace(experiment=SimpleNamespace(), run_id="abc")
    assert log_final(stand_in, METRICS, model=("student", "distill"), task=task()) is None
    log_task_data(stand_in, task())


class _RacedClient:
    """An MLflow client whose tag write loses a race: another worker's INSERT lands first (when `other_wins`), and
    this one fails on the store's unique key, as two search workers starting at once did on sqlite."""

    def __init__(self, other_wins: bool) -> None:
        self.tags: dict[str, str] = {}
        self.other_wins = other_wins

    def get_experiment(self, experiment_id):
        return SimpleNamespace(tags=dict(self.tags))

    def set_experiment_tag(self, experiment_id, key, value):
        from mlflow.exceptions import MlflowException

        if self.other_wins:
            self.tags[key] = value
        raise MlflowException("UNIQUE constraint failed: experiment_tags.key, experiment_tags.experiment_id")


def test_a_tag_another_worker_wrote_first_is_not_an_error():
    from mlflow.exceptions import MlflowException

    raced = _RacedClient(other_wins=True)
    tag_experiment(raced, "1")
    assert raced.tags[EXPERIMENT_KIND] == MODEL_TRAINING and VIEW_TAG in raced.tags
    with pytest.raises(MlflowException):  # a write that failed for another reason still fails
        tag_experiment(_RacedClient(other_wins=False), "1")


def test_datasets_another_worker_added_first_are_logged_on_the_second_try(monkeypatch):
    """Two workers logging the same rows at once: the first write loses on the store's unique key, the second
    finds the dataset and adds the run's input; a store that keeps failing still fails."""
    from mlflow.exceptions import MlflowException

    from compress.infra import tracking

    class Store:
        def __init__(self, failures: int) -> None:
            self.failures, self.logged = failures, []

        def log_inputs(self, run_id, datasets):
            if self.failures:
                self.failures -= 1
                raise MlflowException("UNIQUE constraint failed: datasets.experiment_id, datasets.name")
            self.logged.append((run_id, [d.dataset.name for d in datasets]))

    store = Store(failures=1)
    monkeypatch.setattr(tracking, "_client_of", lambda logger: store)
    log_task_data(SimpleNamespace(run_id="r1"), task())
    assert store.logged == [("r1", ["tiny train", "tiny dev"])]
    monkeypatch.setattr(tracking, "_client_of", lambda logger: Store(failures=2))
    with pytest.raises(MlflowException):
        log_task_data(SimpleNamespace(run_id="r1"), task())


def test_a_studys_parent_run_sets_the_training_view(tmp_path):
    """A search's parent run is the first run of a fresh store, made before any step's logger: its experiment opens
    in the training view too."""
    import optuna
    from mlflow import MlflowClient

    from compress.search.study import _parent_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db", study_name="s")
    _, exp_id = _parent_run({"objectives": "score,params", "storage": "x"}, study, uri, "fresh", "s")
    tags = MlflowClient(uri).get_experiment(exp_id).tags
    assert tags[EXPERIMENT_KIND] == MODEL_TRAINING and VIEW_TAG in tags
