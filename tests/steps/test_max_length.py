"""--max_length left out: the smaller of 128 and the fewest tokens any model in the run takes, so a model with a short
position table runs at its own length; a length typed past a model's positions is still refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import FAST, error_lines, mlflow_runs, run_main, save_tiny_bert, sqlite_uri, track

from compress.models.loading import resolve_max_length


@pytest.fixture(scope="module")
def short_bert(tmp_path_factory) -> Path:
    """The tiny BERT classifier with 64 positions instead of 128."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder = save_tiny_bert(tmp_path_factory.mktemp("short") / "bert")
    config = AutoConfig.from_pretrained(folder)
    config.max_position_embeddings = 64
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    return folder


def _config(model_type: str, positions: int, pad: int = 0):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, max_position_embeddings=positions, pad_token_id=pad)


@pytest.mark.parametrize(("requested", "models", "length"), [
    (None, [("bert", 512)], 128),
    (None, [("bert", 64)], 64),
    (None, [("bert", 512), ("bert", 64), None], 64),  # the fewest any model takes; a missing config is skipped
    (None, [("roberta", 514, 1)], 128),
    (None, [("roberta", 66, 1)], 64),  # RoBERTa numbers positions from its pad id + 1
    (None, [("mpnet", 66, 1)], 64),  # so does MPNet: all-mpnet-base-v2's 514 rows hold 512 tokens
    (None, [("bert", 512), ("mpnet", 514, 1)], 128),
    (None, [], 128),
    (100, [("bert", 64)], 100),  # typed: kept, for load_tokenizer to refuse by name
])
def test_resolve_max_length(requested, models, length) -> None:
    configs = [_config(*m) if m else None for m in models]
    assert resolve_max_length(requested, configs) == length


@pytest.mark.parametrize("command", ["finetune", "distill", "prune", "share"])
def test_a_64_position_model_trains_at_the_default_and_logs_64(command: str, short_bert: Path, tiny_data: Path,
                                                               workdir: Path) -> None:
    model = ["--teacher", short_bert, "--layers", "1"] if command == "distill" else ["--model", short_bert]
    extra = {"finetune": ["--epochs", "1"], "distill": ["--epochs", "1"],
             "prune": ["--heads", "0.5", "--recover_epochs", "0"],
             "share": ["--init", "first", "--recover_epochs", "0"]}[command]
    code, _, err = run_main([command, *model, "--data", tiny_data, *extra, "--output", "out", *track(workdir), *FAST])
    assert code == 0, err[-3000:]
    _, runs = mlflow_runs(sqlite_uri(workdir))
    (run,) = runs
    assert run.data.params["max_length"] == "64"


def test_a_64_position_model_evaluates_at_the_default(short_bert: Path, tiny_data: Path, workdir: Path) -> None:
    code, out, err = run_main(["evaluate", "--model", short_bert, "--data", tiny_data, *FAST])
    assert code == 0, err[-3000:]
    assert '"latency_shape": [32, 64]' in out  # timed at the longest input it takes, not the 128 default


@pytest.mark.parametrize("command", ["finetune", "evaluate"])
def test_a_typed_length_past_the_positions_is_refused(command: str, short_bert: Path, tiny_data: Path,
                                                      workdir: Path) -> None:
    code, out, err = run_main([command, "--model", short_bert, "--data", tiny_data, "--max_length", "100",
                               *(["--output", "out", *track(workdir)] if command == "finetune" else []), *FAST])
    assert code == 1 and out == "" and "Traceback" not in err
    (line,) = error_lines(err)
    assert line == f"compress: error: --max_length 100: --model {short_bert} takes at most 64 tokens"
