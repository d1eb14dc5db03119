"""compress search hands its data flags to every run it starts: --quoting reaches the teacher's fine-tuning and each
trial, and --max_length left out follows a short position table there as it does in the commands."""

from __future__ import annotations

from pathlib import Path

from helpers import mlflow_runs, run_search, save_tiny_bert


def test_a_headless_64_position_teacher_and_a_csv_quoted_tsv(tmp_path: Path, tiny_data: Path) -> None:
    from transformers import AutoConfig, AutoModel

    teacher = save_tiny_bert(tmp_path / "teacher", head=False)
    config = AutoConfig.from_pretrained(teacher)
    config.max_position_embeddings = 64
    AutoModel.from_config(config).save_pretrained(teacher)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.tsv", "dev.tsv"):  # the tiny rows, one of them wrapped in quotes: auto would read it raw
        lines = (tiny_data / name).read_text().splitlines()
        lines[1] = '"a good film"\t1'
        (data / name).write_text("\n".join(lines) + "\n")
    tracking = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    space = {"layers": [1], "epochs": 1, "teacher_epochs": 1, "latency_reps": 1, "batch_size": 32}
    result = run_search(teacher=str(teacher), data=str(data), quoting="csv", space=space, objectives="score",
                        trials=1, study="short", output=str(tmp_path / "out"), tracking=tracking,
                        storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert len(result.rows) == 1
    _, runs = mlflow_runs(tracking)
    trained = {r.data.tags.get("compress.command"): r.data.params for r in runs
               if r.data.tags.get("compress.command") in ("finetune", "distill")}
    assert set(trained) == {"finetune", "distill"}  # the teacher's fine-tuning, then the trial
    for params in trained.values():
        assert params["max_length"] == "64" and params["quoting"] == "csv"
