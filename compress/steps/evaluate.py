"""compress evaluate: a saved model's task score, size and speed."""

from __future__ import annotations

import sys

from compress.infra.results import StepResult
from compress.options.groups import DataConfig, EvaluateConfig, RuntimeConfig


def evaluate(step: EvaluateConfig, data: DataConfig | None = None, runtime: RuntimeConfig | None = None) -> StepResult:
    """Score `step.model` on the task's dev split, count its parameters and size, and time it.

    `runtime` gives the accelerator and the latency rounds (latency_reps). The table goes to stderr; the result's
    `report` is the dict that `compress evaluate` prints as one JSON line (and writes to `step.json_out`).
    """
    from compress.data.tasks import load_task
    from compress.models.loading import (load_classifier, load_config, load_tokenizer, max_tokens, require_task_head,
        resolve_max_length, resolve_model)

    from compress.infra.errors import CompressError
    from compress.options.commands import with_defaults
    from compress.options.bounds import check_all
    from compress.infra.paths import check_file_output, write_json

    data, runtime = with_defaults("evaluate", data=data, runtime=runtime)
    model, batch_size, max_length = step.model, step.batch_size, data.max_length
    latency_batch, latency_seq, latency_reps = step.latency_batch, step.latency_seq, runtime.latency_reps
    # input checks first: a bad flag should not wait for Lightning's import
    check_all(batch_size=batch_size, latency_batch=latency_batch, latency_seq=latency_seq,
              latency_reps=latency_reps, max_length=max_length)
    json_file = check_file_output(step.json_out, "--json_out") if step.json_out else None
    task_data = load_task(data.task, data.data, text_column=data.text_column, label_column=data.label_column,
                          quoting=data.quoting)
    path = resolve_model(model, "--model")
    config = load_config(path, "--model")
    require_task_head(config, task_data, model)
    max_length = resolve_max_length(max_length, [config])
    positions = max_tokens(config)
    if positions and latency_seq > positions and latency_seq == EvaluateConfig.latency_seq:
        latency_seq = positions  # the default, not typed: time the longest input the model takes
    if positions and latency_seq > positions:
        raise CompressError(f"--latency_seq {latency_seq}: {model} takes at most {positions} tokens")

    from compress.data.datamodule import TaskDataModule
    from compress.models.measure import count_params, latency_ms, weights_mb
    from compress.engine.trainer import quiet_libraries, resolve_accelerator, resolve_precision
    from compress.engine.scoring import score

    quiet_libraries()
    # any text classifier transformers loads scores, like any teacher distill takes (an MPNet or DeBERTa teacher)
    net = load_classifier(path, task_data.label_names, "--model", any_encoder=True)
    tokenizer = load_tokenizer(path, "--model", net.config, max_length)
    accelerator = resolve_accelerator(runtime.accelerator)
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
    if json_file is not None:
        write_json(json_file, result)
    metrics = {"score": value, "params": result["params"], "mb": result["mb"], "latency_ms": lat}
    return StepResult(str(json_file) if json_file is not None else None, metrics, report=result)
