"""MLflow's side of an export: the source run, a model read from a run, and a registered model version."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from compress.infra.errors import CompressError
from compress.infra.tracking import for_mlflow, mlflow_client, shown


def store_exists(uri: str) -> bool:
    """Whether an MLflow store is there to read; a sqlite URI whose file is missing would be created empty."""
    from compress.infra.tracking import sqlite_file

    db = sqlite_file(uri)
    return db.is_file() if db is not None else True


def get_run(run_id: str, tracking: str, flag: str = "--run"):
    """The MLflow run, or a CompressError naming the flag and the store."""
    if not store_exists(tracking):
        raise CompressError(f"{flag} {run_id}: no MLflow store at --tracking {shown(tracking)}")
    client = mlflow_client(tracking)  # checks the store before mlflow is imported
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise CompressError(f"{flag} {run_id}: no such MLflow run in {shown(tracking)}") from None


def model_from_run(run_id: str, tracking: str, scratch: Path) -> str:
    """The model folder of an MLflow run: its `output` param when that folder still holds this run's model,
    else its `model` artifact folder, downloaded into `scratch`."""
    from compress.infra.lineage import read_lineage

    run = get_run(run_id, tracking)
    output = run.data.params.get("output")
    # a relative output is relative to where the run was started, and a later run may have overwritten the
    # folder: only a folder whose compress.json names this run is this run's model; else the artifact is
    if output and (Path(output) / "config.json").is_file() and read_lineage(output).get("mlflow_run_id") == run_id:
        return output
    client = mlflow_client(tracking)
    if not any(a.path == "model/config.json" for a in client.list_artifacts(run_id, "model")):
        raise CompressError(
            f"--run {run_id}: its output folder {output or '(none)'} is gone and it logged no 'model' artifact"
        )
    import mlflow.artifacts

    scratch.mkdir(parents=True, exist_ok=True)
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model", dst_path=str(scratch),
                                               tracking_uri=tracking)


def source_run_info(run_id: str | None, stores: list[str]) -> dict:
    """Metrics, params, tags and the step count of the model's MLflow run, from the first store that has it."""
    if not run_id:
        return {}
    from mlflow.exceptions import MlflowException

    for uri in dict.fromkeys(s for s in stores if s):
        if not store_exists(uri):
            continue
        try:
            client = mlflow_client(uri)
        except CompressError:  # a store named in the model's record may since have become another tool's file
            continue
        try:
            run = client.get_run(run_id)
        except MlflowException:
            continue
        steps = None
        for key in ("epoch", "loss_epoch", "loss_step"):  # Lightning logs these at the global step
            if key in run.data.metrics:
                history = client.get_metric_history(run_id, key)
                steps = max(m.step for m in history) + 1 if history else None
                break
        metrics = {k: v for k, v in sorted(run.data.metrics.items()) if k != "epoch"}
        return {"run_id": run_id, "tracking": shown(uri), "experiment_id": run.info.experiment_id, "metrics": metrics,
                "params": dict(run.data.params), "tags": dict(run.data.tags), "steps": steps}
    return {}


@contextmanager
def _tracking_uri(uri: str):
    """Point MLflow's global tracking URI at `uri` for the block, then put back whatever was there (even unset)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    previous = getattr(utils, "_tracking_uri", None)
    mlflow.set_tracking_uri(for_mlflow(uri))
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def register(folder: Path, name: str, *, tracking: str, experiment: str, source: dict, summary: dict) -> dict:
    """Log `folder` as the `model` artifact of a new export run and register runs:/<id>/model as NAME.

    MLflow 3's register_model wants an MLmodel file at a runs:/ path (or a logged model), so one describing the
    folder's formats goes in beside the files; the registered version's source is the artifact folder itself.
    """
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from compress.infra.tracking import _prepare_store, run_tags, tag_experiment

    artifacts = _prepare_store(tracking)
    client = mlflow_client(tracking)
    # the model's run can be the parent only in its own store (the record holds the URL with its password hidden)
    same_store = source.get("tracking") == shown(tracking)
    run_id = None
    try:
        tags = run_tags("cpu", "export")
        if same_store:
            exp_id = source["experiment_id"]
            tags |= {"compress.source_run": source["run_id"], "mlflow.parentRunId": source["run_id"]}
        else:
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifacts)
            tag_experiment(client, exp_id)
            if source.get("run_id"):
                tags["compress.source_run"] = source["run_id"]
        run_id = client.create_run(exp_id, run_name=f"export {name}", tags=tags).info.run_id
        for key, value in summary["params"].items():
            client.log_param(run_id, key, value)
        for key, value in summary["metrics"].items():
            client.log_metric(run_id, key, float(value))
        client.log_artifacts(run_id, str(folder), "model")
        mlmodel = Model(artifact_path="model", run_id=run_id)
        mlmodel.add_flavor("compress", formats=summary["params"]["formats"].split(","), files=summary["files"])
        with tempfile.TemporaryDirectory() as tmp:
            mlmodel.save(str(Path(tmp) / "MLmodel"))
            client.log_artifact(run_id, str(Path(tmp) / "MLmodel"), "model")
        client.set_terminated(run_id)
        version_tags = {"compress.formats": summary["params"]["formats"]}
        if source.get("run_id"):
            version_tags["compress.source_run"] = source["run_id"]
        with _tracking_uri(tracking):  # register_model has no tracking_uri argument; it reads the global one
            version = mlflow.register_model(f"runs:/{run_id}/model", name, tags=version_tags)
    except MlflowException as err:
        if run_id:
            client.set_terminated(run_id, "FAILED")
        raise CompressError(f"--register {name}: MLflow refused it ({str(err).splitlines()[0]})") from None
    return {"name": version.name, "version": str(version.version), "run_id": run_id, "tracking": shown(tracking)}
