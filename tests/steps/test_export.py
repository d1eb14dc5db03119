"""compress export: round trips for every model kind compress makes, ONNX parity on new shapes, onnxruntime's graph
fusions and their fallback, int8 that scores, the model card, the MLflow registry, --run lookups, and a clean one-line
error for each bad input."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import cli_error, one_torch_thread, save_tiny_bert

from compress.cli.main import main
from compress.exporting.onnx import INT8_FILE, ONNX_FILE, onnx_session, random_inputs
from compress.exporting.predict import metric_value, predict_dev
from compress.steps.export import parse_formats
from compress.infra.errors import CompressError

pytestmark = pytest.mark.filterwarnings("ignore")


one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


def run_cli(*args: str) -> dict:
    """Run `compress ...` in-process; returns the JSON summary export prints on stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([str(a) for a in args])
    return json.loads(out.getvalue().strip().splitlines()[-1])


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def reload(folder: Path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(folder).eval()


def onnx_logits(path: Path, batch: dict) -> np.ndarray:
    session = onnx_session(path)
    names = [i.name for i in session.get_inputs()]
    return session.run(["logits"], {n: batch[n].numpy() for n in names})[0]


# --- a trained model with lineage and an MLflow run, as distill leaves them ---------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_teacher, store) -> dict:
    from mlflow import MlflowClient

    from compress.infra.tracking import _prepare_store
    from compress.infra.lineage import write_lineage

    folder = tmp_path_factory.mktemp("trained") / "student"
    shutil.copytree(tiny_teacher, folder)
    client = MlflowClient(store)
    exp = client.create_experiment("compress", artifact_location=_prepare_store(store))
    run_id = client.create_run(exp, run_name="distill L4", tags={"compress.command": "distill"}).info.run_id
    for key, value in {"command": "distill", "task": "toy", "train_rows": 96, "dev_rows": 32, "epochs": 2,
                       "batch_size": 8, "lr": 1e-4, "teacher": "tiny-teacher", "output": str(folder)}.items():
        client.log_param(run_id, key, value)
    metrics = {"student_score": 0.8125, "teacher_score": 0.875, "retention": 0.9286, "student_params": 40386}
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    for step in (11, 23):  # Lightning logs `epoch` at the global step: 2 epochs of 12 batches
        client.log_metric(run_id, "epoch", step // 12, step=step)
    write_lineage(folder, {"command": "distill", "task": "toy", "metric": "accuracy", "label_names": ["0", "1"],
                           "mlflow_run_id": run_id, "tracking": store, "metrics": metrics,
                           "teacher": "tiny-teacher", "student_init": "teacher layers [0, 1, 2, 3]"})
    client.log_artifacts(run_id, str(folder), "model")
    client.set_terminated(run_id)
    return {"folder": folder, "run_id": run_id, "metrics": metrics}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained, tiny_data, store) -> dict:
    out = tmp_path_factory.mktemp("export") / "student-export"
    summary = run_cli("export", "--model", trained["folder"], "--data", tiny_data, "--output", out,
                      "--register", "tiny-student", "--tracking", store)
    return {"out": out, "summary": summary}


def test_export_writes_every_format_atomically(exported) -> None:
    out = exported["out"]
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "compress.json", ONNX_FILE,
            INT8_FILE} <= names
    assert sorted(p.name for p in out.parent.iterdir() if out.name in p.name) == [out.name]  # no temporary left
    assert len({p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}) == 1  # weights as readable as all
    assert exported["summary"]["formats"] == ["hf", "onnx", "int8"]
    assert exported["summary"]["fusion"] == {"mode": "auto", "fused": True, "exporter": "torchscript", "ops": {
        "EmbedLayerNormalization": 1, "Attention": 4, "BiasGelu": 4, "SkipLayerNormalization": 8}, "note": None}
    lineage = json.loads((out / "compress.json").read_text())
    assert lineage["command"] == "distill" and lineage["export"]["formats"] == ["hf", "onnx", "int8"]


def test_hf_round_trip_gives_equal_logits(exported, trained) -> None:
    batch = random_inputs(["input_ids", "attention_mask", "token_type_ids"], 3, 11, 27, seed=5)
    torch.testing.assert_close(logits(reload(exported["out"]), batch), logits(reload(trained["folder"]), batch),
                               rtol=0, atol=0)


def test_onnx_matches_pytorch_on_new_shapes(exported, trained) -> None:
    model = reload(trained["folder"])
    for batch_size, seq in ((4, 45), (1, 3), (7, 128)):  # none is the traced 2x16
        batch = random_inputs(["input_ids", "attention_mask", "token_type_ids"], batch_size, seq, 27, seed=seq)
        got = onnx_logits(exported["out"] / ONNX_FILE, batch)
        assert got.shape == (batch_size, 2)
        assert np.abs(got - logits(model, batch).numpy()).max() <= 1e-4
    graph_inputs = onnx_session(exported["out"] / ONNX_FILE).get_inputs()
    assert all(isinstance(d, str) for i in graph_inputs for d in i.shape)  # both axes symbolic, none fixed
    assert max(exported["summary"]["parity_max_abs_diff"].values()) <= 1e-4


def test_int8_loads_scores_and_is_smaller(exported, tiny_data) -> None:
    from transformers import AutoTokenizer

    from compress.data.tasks import load_task

    out = exported["out"]
    scores = exported["summary"]["scores"]
    assert scores["metric"] == "accuracy" and 0.0 <= scores["fp32"] <= 1.0 and 0.0 <= scores["int8"] <= 1.0
    session = onnx_session(out / INT8_FILE)
    task = load_task(data=str(tiny_data))
    names = [i.name for i in session.get_inputs()]
    preds = predict_dev(lambda feed: session.run(["logits"], feed)[0], AutoTokenizer.from_pretrained(out), task,
                        names, max_length=32, batch_size=8)
    assert len(preds) == len(task.dev_labels)
    assert metric_value("accuracy", preds, task.dev_labels) == pytest.approx(scores["int8"])
    files = exported["summary"]["files"]
    assert files["int8"]["mb"] < files["onnx"]["mb"]
    # quantized from the fused graph: its attention is onnxruntime's int8 QAttention
    assert "QAttention" in {n.op_type for n in onnx.load(str(out / INT8_FILE)).graph.node}
    assert max(exported["summary"]["int8_max_abs_diff"].values()) < 0.05


def test_model_card_has_lineage_and_run_metrics(exported, trained) -> None:
    card = (exported["out"] / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: text-classification" in card
    for text in ("tiny-teacher", "24 optimizer steps", "96 train rows", trained["run_id"], "| student_score | 0.8125 |",
                 "| teacher_score | 0.875 |", "model.int8.onnx", "ONNX parity"):
        assert text in card, text


def test_register_creates_a_model_version(exported, trained, store) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(store, registry_uri=store)
    versions = client.search_model_versions("name='tiny-student'")
    assert [str(v.version) for v in versions] == ["1"]
    version = versions[0]
    assert version.tags["compress.source_run"] == trained["run_id"]
    assert version.source.endswith("/model")
    logged = {a.path for a in client.list_artifacts(version.run_id, "model")}
    assert {"model/MLmodel", f"model/{ONNX_FILE}", f"model/{INT8_FILE}", "model/README.md"} <= logged
    export_run = client.get_run(version.run_id)
    assert export_run.data.tags["mlflow.parentRunId"] == trained["run_id"]
    assert "int8_score" in export_run.data.metrics and "parity_max_abs_diff" in export_run.data.metrics
    assert export_run.data.params["fuse"] == "auto" and export_run.data.params["onnx_exporter"] == "torchscript"
    assert export_run.data.params["fused_ops"] == ("EmbedLayerNormalization x1, Attention x4, BiasGelu x4, "
                                                   "SkipLayerNormalization x8")
    assert export_run.data.metrics["fused_Attention"] == 4 and export_run.data.metrics["onnx_fused"] == 1


def test_register_into_another_store_makes_a_training_view_experiment(trained, tiny_data, tmp_path) -> None:
    from mlflow import MlflowClient

    from compress.infra.tracking import EXPERIMENT_KIND, MODEL_TRAINING, VIEW_TAG

    other = f"sqlite:///{tmp_path}/other.db"  # not the model's store: export makes the experiment there itself
    run_cli("export", "--model", trained["folder"], "--data", tiny_data, "--format", "hf", "--output",
            tmp_path / "e", "--register", "elsewhere", "--tracking", other)
    client = MlflowClient(other)
    tags = client.get_experiment_by_name("compress").tags
    assert tags[EXPERIMENT_KIND] == MODEL_TRAINING and VIEW_TAG in tags
    assert [str(v.version) for v in client.search_model_versions("name='elsewhere'")] == ["1"]


# --- the other model kinds: ALBERT (share --share all) and compress_bert (prune, partial share) -------------------


def save_albert(folder: Path, tokenizer_from: Path) -> Path:
    from transformers import AlbertConfig, AlbertForSequenceClassification

    config = AlbertConfig(vocab_size=27, embedding_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0, num_labels=2)
    torch.manual_seed(1)
    AlbertForSequenceClassification(config).save_pretrained(folder)
    for f in tokenizer_from.glob("tokenizer*"):
        shutil.copy(f, folder)
    return folder


def save_compress_bert(folder: Path, tokenizer_from: Path) -> Path:
    modeling = pytest.importorskip("compress.models.compress_bert")
    # pruned unevenly (one attention module keeps no heads) and partly shared (layers 0 and 2 share an FFN)
    config = modeling.CompressBertConfig(
        vocab_size=27, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        attention_heads=[4, 0, 2], intermediate_sizes=[64, 16], ffn_map=[0, 1, 0], max_position_embeddings=128,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    torch.manual_seed(2)
    model = modeling.CompressBertForSequenceClassification(config)
    with torch.no_grad():  # logits of a fresh init are ~1e-3; scale the head so the parity check means something
        model.classifier.weight.mul_(100)
    model.save_pretrained(folder)
    for f in tokenizer_from.glob("tokenizer*"):
        shutil.copy(f, folder)
    return folder


@pytest.mark.parametrize("kind", ["albert", "compress_bert"])
def test_round_trip_other_model_kinds(kind, tmp_path, tiny_teacher) -> None:
    make = {"albert": save_albert, "compress_bert": save_compress_bert}[kind]
    src = make(tmp_path / kind, tiny_teacher)
    out = tmp_path / "out"
    summary = run_cli("export", "--model", src, "--format", "hf,onnx", "--output", out)
    assert summary["formats"] == ["hf", "onnx"] and not (out / INT8_FILE).exists()
    exported = reload(out)
    assert exported.config.model_type == kind and type(exported).__name__ == type(reload(src)).__name__
    batch = random_inputs(["input_ids", "attention_mask", "token_type_ids"], 5, 23, 27, seed=3)
    expected = logits(reload(src), batch)
    torch.testing.assert_close(logits(exported, batch), expected, rtol=0, atol=0)
    assert np.abs(onnx_logits(out / ONNX_FILE, batch) - expected.numpy()).max() <= 1e-4
    if kind == "compress_bert":  # loads where compress is not installed: the code travels with the weights
        assert (out / "modeling_compress_bert.py").exists()
        assert "auto_map" in json.loads((out / "config.json").read_text())
    # the card's snippet runs as written, in a Python that cannot import compress, for each set of formats
    for formats in ("hf,onnx", "onnx"):
        card_out = tmp_path / f"card-{formats}"
        run_cli("export", "--model", src, "--format", formats, "--output", card_out)
        card = (card_out / "README.md").read_text()
        snippet = card.split("```python\n", 1)[1].split("\n```", 1)[0]
        if kind == "compress_bert":
            assert f'AutoTokenizer.from_pretrained("{card_out.name}", trust_remote_code=True)' in snippet
        proc = subprocess.run([sys.executable, "-c", f"import sys; sys.modules['compress'] = None\n{snippet}\n"
                               "print(logits.shape)"], cwd=tmp_path,  # the card names the folder as it is written
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120, check=False)
        assert proc.returncode == 0 and "(1, 2)" in proc.stdout, proc.stderr[-2000:]


# --- finding the model through its MLflow run ---------------------------------------------------------------------


def test_run_id_finds_the_output_folder(tmp_path, trained, store) -> None:
    out = tmp_path / "by-run"
    summary = run_cli("export", "--run", trained["run_id"], "--format", "hf", "--output", out, "--tracking", store)
    assert summary["source"] == f"run {trained['run_id']}" and summary["source_run"] == trained["run_id"]
    assert "| student_score | 0.8125 |" in (out / "README.md").read_text()


def test_run_id_falls_back_to_the_model_artifact(tmp_path, trained, store) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(store)
    run_id = client.create_run(client.get_experiment_by_name("compress").experiment_id).info.run_id
    client.log_param(run_id, "output", str(tmp_path / "deleted-long-ago"))
    client.log_artifacts(run_id, str(trained["folder"]), "model")
    out = tmp_path / "from-artifact"
    run_cli("export", "--run", run_id, "--format", "hf", "--output", out, "--tracking", store)
    batch = random_inputs(["input_ids", "attention_mask"], 2, 9, 27, seed=9)
    torch.testing.assert_close(logits(reload(out), batch), logits(reload(trained["folder"]), batch), rtol=0, atol=0)


# --- failures: one line, exit 1, nothing written ------------------------------------------------------------------


def test_parity_failure_is_loud_and_writes_nothing(tmp_path, monkeypatch, capsys, exported) -> None:
    """An ONNX graph that computes something else (here: another model's weights) must stop the export."""
    import compress.steps.export as export_module

    other = save_tiny_bert(tmp_path / "other", seed=1)  # same shapes as the exported tiny teacher, other weights

    def wrong_graph(model, tokenizer, path):
        shutil.copy(exported["out"] / ONNX_FILE, path)
        return ["input_ids", "attention_mask", "token_type_ids"]

    monkeypatch.setattr(export_module, "export_onnx", wrong_graph)
    out = tmp_path / "out"
    message = cli_error(capsys, "export", "--model", other, "--format", "hf,onnx", "--fuse", "off", "--output", out)
    assert "differs from PyTorch" in message and "nothing was written" in message
    assert not out.exists() and not [p for p in out.parent.iterdir() if "out" in p.name]


def test_fused_graph_failing_parity_is_never_shipped(tmp_path, monkeypatch, capsys, tiny_teacher) -> None:
    """--fuse auto: a fused graph off by more than the limit gives way to the unfused dynamo graph, with a note;
    --fuse on: the same is an error, and nothing is written."""
    from compress.exporting import fusion

    real_fuse = fusion._fuse

    def off_by_one(src, dst, config):  # the real fusions, then the classifier's bias moved by 1
        counts = real_fuse(src, dst, config)
        graph = onnx.load(str(dst))
        bias = next(t for t in graph.graph.initializer if t.name.endswith("classifier.bias"))
        bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) + 1.0, bias.name))
        onnx.save(graph, str(dst))
        return counts

    monkeypatch.setattr(fusion, "_fuse", off_by_one)
    summary = run_cli("export", "--model", tiny_teacher, "--format", "onnx,int8", "--output", tmp_path / "auto")
    assert "note: graph fusion skipped (the fused graph differs from PyTorch by 1" in capsys.readouterr().err
    fusion = summary["fusion"]
    assert (fusion["mode"], fusion["fused"], fusion["exporter"], fusion["ops"]) == ("auto", False, "dynamo", {})
    assert fusion["note"].startswith("the fused graph differs from PyTorch by 1 in the logits")
    assert max(summary["parity_max_abs_diff"].values()) <= 1e-4
    for name in (ONNX_FILE, INT8_FILE):  # both from the dynamo graph: no onnxruntime-only operator in either
        assert {n.domain for n in onnx.load(str(tmp_path / "auto" / name)).graph.node} <= {"", "ai.onnx"}

    message = cli_error(capsys, "export", "--model", tiny_teacher, "--fuse", "on", "--output", tmp_path / "on")
    assert "error: --fuse on: the fused graph differs from PyTorch by 1 in the logits" in message
    assert message.endswith("nothing was written")
    assert not (tmp_path / "on").exists()


def test_parse_formats() -> None:
    assert parse_formats("hf") == ["hf"]
    assert parse_formats(" INT8, onnx ,int8") == ["int8", "onnx"]
    for bad, message in (("", "empty"), (" , ", "empty"), ("hf,tflite", "unknown format 'tflite'")):
        with pytest.raises(CompressError, match=message):
            parse_formats(bad)


def test_metrics_by_hand() -> None:
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert metric_value("accuracy", preds, labels) == pytest.approx(3 / 5)
    assert metric_value("f1", preds, labels) == pytest.approx(2 / (2 + 0.5 * 2))  # tp 2, fp 1, fn 1
    # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert metric_value("matthews", preds, labels) == pytest.approx(1 / 6)
    assert metric_value("matthews", [0, 0], [0, 0]) == 0.0


@pytest.mark.parametrize("case", [
    "missing-model", "unknown-format", "empty-format", "model-and-run", "neither", "unknown-run", "no-store",
    "output-exists", "no-head", "label-mismatch", "max-length-past-positions",
])
def test_bad_input_is_one_line(case, capsys, workdir, tiny_teacher, tiny_encoder, tiny_data, store, trained) -> None:
    (workdir / "taken").mkdir()
    three = workdir / "three"
    three.mkdir()
    (three / "train.tsv").write_text("sentence\tlabel\ngood\t0\nbad\t1\nmeh\t2\n")
    (three / "dev.tsv").write_text("sentence\tlabel\ngood\t0\n")
    args, expected = {
        "missing-model": (["--model", workdir / "nope"], "--model"),
        "unknown-format": (["--model", tiny_teacher, "--format", "hf,tflite"], "unknown format 'tflite'"),
        "empty-format": (["--model", tiny_teacher, "--format", ","], "--format"),
        "model-and-run": (["--model", tiny_teacher, "--run", trained["run_id"]], "exactly one of --model"),
        "neither": ([], "exactly one of --model"),
        "unknown-run": (["--run", "0123456789abcdef", "--tracking", store], "no such MLflow run"),
        "no-store": (["--run", "0123456789abcdef", "--tracking", f"sqlite:///{workdir}/none/mlflow.db"],
                     "no MLflow store"),
        "output-exists": (["--model", tiny_teacher, "--output", workdir / "taken"], "already exists"),
        "no-head": (["--model", tiny_encoder, "--format", "hf"], "no sequence-classification head"),
        "label-mismatch": (["--model", tiny_teacher, "--data", three], "3 labels"),
        "max-length-past-positions": (["--model", tiny_teacher, "--max_length", "512"], "at most 128 tokens"),
    }[case]
    message = cli_error(capsys, "export", *args)
    assert expected in message
    assert not (workdir / "outputs").exists()
    assert not (workdir / "none").exists()  # looking a run up never creates an empty store
