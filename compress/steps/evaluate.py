"""compress evaluate: a saved model's task score, size and speed."""

from __future__ import annotations

import json
import sys


def evaluate(
    model: str,
    task: str | None = None,
    data: str | None = None,
    batch_size: int = 64,
    max_length: int = 128,
    text_column: str | None = None,
    label_column: str = "label",
    accelerator: str = "auto",
    latency_batch: int = 32,
    latency_seq: int = 128,
    latency_reps: int = 5,
    json_out: str | None = None,
) -> None:
    """Report a model's task metric on the dev split, its parameters, size on disk and latency.

    The table goes to stderr; stdout gets the same result as one JSON line, for scripts.

    Args:
        model: a saved model folder (or hub name) with a classifier for the task's labels.
        task: a GLUE task (sst2, mnli, ...) or bbc-news. Exclusive with --data.
        data: a folder with train and dev files (.tsv, .csv or .jsonl); the dev file is scored.
        batch_size: examples per evaluation batch.
        max_length: tokens per example; longer inputs are truncated.
        text_column: column(s) holding the text, "a" or "a,b" for pairs.
        label_column: column holding the label.
        accelerator: auto, cpu or cuda.
        latency_batch: batch size of the latency measurement.
        latency_seq: sequence length of the latency measurement.
        latency_reps: timed rounds of the latency measurement.
        json_out: also write the results to this JSON file.
    """
    from compress.data.tasks import load_task
    from compress.models.loading import (load_classifier, load_config, load_tokenizer, max_tokens, require_task_head,
        resolve_model)

    from compress.infra.errors import CompressError
    from compress.options.bounds import check_all
    from compress.infra.paths import check_file_output, write_json

    # input checks first: a bad flag should not wait for Lightning's import
    check_all(batch_size=batch_size, latency_batch=latency_batch, latency_seq=latency_seq,
              latency_reps=latency_reps, max_length=max_length)
    json_file = check_file_output(json_out, "--json_out") if json_out else None
    task_data = load_task(task, data, text_column=text_column, label_column=label_column)
    path = resolve_model(model, "--model")
    config = load_config(path, "--model")
    require_task_head(config, task_data, model)
    if (positions := max_tokens(config)) and latency_seq > positions:
        raise CompressError(f"--latency_seq {latency_seq}: {model} takes at most {positions} tokens")

    from compress.data.datamodule import TaskDataModule
    from compress.models.measure import count_params, latency_ms, weights_mb
    from compress.engine.trainer import quiet_libraries, resolve_accelerator, resolve_precision
    from compress.engine.scoring import score

    quiet_libraries()
    net = load_classifier(path, task_data.label_names, "--model")
    tokenizer = load_tokenizer(path, "--model", net.config, max_length)
    accelerator = resolve_accelerator(accelerator)
    dm = TaskDataModule(task_data, tokenizer, eval_batch_size=batch_size, max_length=max_length)
    value = score(net, dm, task_data.metric, task_data.num_labels, accelerator, resolve_precision("auto", accelerator))
    device = "cuda" if accelerator == "cuda" else "cpu"
    lat = latency_ms({"m": net}, batch=latency_batch, seq=latency_seq, device=device, reps=latency_reps,
                     vocab_size=net.config.vocab_size)["m"]
    result = {"model": model, "task": task_data.name, "metric": task_data.metric, "score": value,
              "params": count_params(net), "mb": weights_mb(path), "latency_ms": lat,
              "latency_shape": [latency_batch, latency_seq], "device": device}
    print(f"{task_data.metric:>10} {value:.4f}\n{'params':>10} {result['params']:,}\n{'MB':>10} {result['mb']:.1f}\n"
          f"{'latency':>10} {lat:.1f} ms at {latency_batch}x{latency_seq} on {device}", file=sys.stderr)
    print(json.dumps(result))
    if json_file is not None:
        write_json(json_file, result)
