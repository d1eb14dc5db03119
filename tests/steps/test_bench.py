"""compress bench: the JSON's schema, PyTorch and ONNX side by side, interleaved rounds, MLflow logging, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import cli_error, save_tiny_bert

from compress.cli.main import _normalise_flags, main
from compress.steps.bench import _label, metric_key, percentile
from compress.models.measure import interleaved_ms

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_teacher) -> dict[str, Path]:
    """A second, shallower PyTorch model, and the teacher as fp32 and int8 ONNX files beside its config."""
    from transformers import AutoTokenizer

    from compress.exporting.onnx import export_onnx, load_for_export, quantize_int8

    root = tmp_path_factory.mktemp("bench")
    small = save_tiny_bert(root / "small", layers=2)
    onnx_dir = root / "teacher-onnx"
    onnx_dir.mkdir()
    model, _ = load_for_export(str(tiny_teacher))
    export_onnx(model, AutoTokenizer.from_pretrained(tiny_teacher), onnx_dir / "model.onnx")
    quantize_int8(onnx_dir / "model.onnx", onnx_dir / "model.int8.onnx")
    shutil.copy(tiny_teacher / "config.json", onnx_dir)
    return {"teacher": tiny_teacher, "small": small, "onnx": onnx_dir / "model.onnx",
            "int8": onnx_dir / "model.int8.onnx"}


def run_bench(*args) -> None:
    main(["bench", *map(str, args)])


FAST = ["--seq", "16", "--warmup", "1", "--reps", "3", "--threads", "1"]


def test_json_schema_and_table(models, tmp_path, capsys) -> None:
    out = tmp_path / "sub" / "bench.json"
    run_bench("--model", models["teacher"], "--model", models["small"], "--model", models["onnx"],
              "--model", models["int8"], "--batch", "1,3", *FAST, "--json", out)
    report = json.loads(out.read_text())
    assert set(report) == {"hardware", "threads", "versions", "settings", "models", "results"}

    hw = report["hardware"]
    assert isinstance(hw["cpu"], str) and hw["cpu"]
    for key in ("logical_cores", "usable_cores"):
        assert isinstance(hw[key], int) and hw[key] >= 1
    assert hw["physical_cores"] is None or isinstance(hw["physical_cores"], int)
    assert hw["gpu"] is None

    threads = report["threads"]
    assert threads["torch"] == 1 and threads["onnxruntime_intra_op"] == 1
    assert isinstance(threads["torch_interop"], int)
    assert report["versions"]["torch"] == torch.__version__
    import onnxruntime

    assert report["versions"]["onnxruntime"] == onnxruntime.__version__
    assert report["settings"] == {"device": "cpu", "batch": [1, 3], "seq": 16, "warmup": 1, "reps": 3,
                                  "torch_dtype": "fp32", "baseline": "teacher"}

    labels = [m["label"] for m in report["models"]]
    assert labels == ["teacher", "small", "teacher-onnx/model.onnx", "teacher-onnx/model.int8.onnx"]
    assert [m["kind"] for m in report["models"]] == ["pytorch", "pytorch", "onnx", "onnx"]
    assert all(isinstance(m["mb"], float) and m["mb"] > 0 for m in report["models"])
    assert isinstance(report["models"][0]["params"], int) and report["models"][2]["params"] is None

    results = report["results"]
    assert [(r["model"], r["batch"]) for r in results] == [(m, b) for b in (1, 3) for m in labels]
    for r in results:
        assert set(r) == {"model", "kind", "batch", "seq", "p50_ms", "p95_ms", "mean_ms", "throughput", "speedup",
                          "times_ms"}
        assert len(r["times_ms"]) == 3 and all(isinstance(t, float) and t > 0 for t in r["times_ms"])
        assert r["p95_ms"] >= r["p50_ms"] > 0
        assert r["throughput"] == pytest.approx(r["batch"] * 1000 / r["p50_ms"])
        first = next(f for f in results if f["batch"] == r["batch"] and f["model"] == "teacher")
        assert r["speedup"] == pytest.approx(first["p50_ms"] / r["p50_ms"])
    assert [r["speedup"] for r in results if r["model"] == "teacher"] == [1.0, 1.0]

    table = capsys.readouterr().out
    assert "p50 ms" in table and "p95 ms" in table
    for label in labels:
        assert label in table


def test_log_to_mlflow_run(models, tmp_path, capsys) -> None:
    from mlflow import MlflowClient

    from compress.infra.tracking import _prepare_store

    store = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(store)
    # an explicit artifact folder: MLflow's default is ./mlruns under the current directory, the checkout here
    experiment = client.create_experiment("compress", artifact_location=_prepare_store(store))
    run_id = client.create_run(experiment).info.run_id
    run_bench("--model", models["teacher"], "--model", models["int8"], "--batch", "2", *FAST, "--run", run_id,
              "--tracking", store)
    metrics = client.get_run(run_id).data.metrics
    for label in ("teacher", "teacher-onnx/model.int8.onnx"):
        for what in ("p50_ms", "p95_ms", "throughput", "speedup"):
            assert metric_key(label, 2, what) in metrics
    assert metrics[metric_key("teacher", 2, "speedup")] == 1.0
    assert "bench/bench.json" in {a.path for a in client.list_artifacts(run_id, "bench")}
    message = cli_error(capsys, "bench", "--model", models["teacher"], *FAST, "--run", "0" * 32, "--tracking", store)
    assert "no such MLflow run" in message


def test_repeated_model_flag_appends() -> None:
    assert _normalise_flags(["bench", "--model", "a", "--model", "b", "--batch", "1"]) == [
        "bench", "--model+", "a", "--model+", "b", "--batch", "1"]
    assert _normalise_flags(["bench", "--model=a"]) == ["bench", "--model+=a"]
    assert _normalise_flags(["bench", "--model", "[a, b]"]) == ["bench", "--model", "[a, b]"]


def test_labels_are_unique() -> None:
    taken: set[str] = set()
    assert [_label(p, taken) for p in ("out/m", "out/m/", "x/m", "e/model.onnx")] == [
        "m", "m#2", "m#3", "e/model.onnx"]


def test_percentile_and_interleaving() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert percentile([7.0], 95) == 7.0
    calls: list[str] = []
    times = interleaved_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, reps=2)
    assert calls == ["a", "b"] * 3  # one warm-up round, then two timed rounds, alternating
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}


@pytest.mark.parametrize("case", ["missing", "not-onnx", "onnx-missing", "batch-zero", "batch-text", "seq-too-long",
                                  "no-store", "weightless-folder", "cuda"])
def test_bad_input_is_one_line(case, models, tmp_path, capsys) -> None:
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    (tmp_path / "notes.txt").write_text("hi")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(models["onnx"], weightless)
    shutil.copy(models["teacher"] / "config.json", weightless)
    teacher = models["teacher"]
    args, expected = {
        "missing": (["--model", tmp_path / "nope"], "no such model folder"),
        "not-onnx": (["--model", tmp_path / "notes.txt"], "not .onnx"),
        "onnx-missing": (["--model", tmp_path / "gone.onnx"], "no such .onnx file"),
        "batch-zero": (["--model", teacher, "--batch", "0"], "--batch"),
        "batch-text": (["--model", teacher, "--batch", "1,big"], "--batch"),
        "seq-too-long": (["--model", teacher, "--seq", "129"], "at most 128 positions"),
        "no-store": (["--model", teacher, "--run", "abc", "--tracking", f"sqlite:///{tmp_path}/no/mlflow.db"],
                     "no MLflow store"),
        "weightless-folder": (["--model", weightless], "model.onnx"),
        "cuda": (["--model", teacher, "--device", "cuda"], "--device cuda"),
    }[case]
    assert expected in cli_error(capsys, "bench", *args, "--reps", "1", "--warmup", "0", "--threads", "1")
