"""compress finetune: a task teacher from a pretrained encoder, tracked in MLflow."""

from __future__ import annotations

from compress.infra.results import StepResult
from compress.options.groups import (DataConfig, FinetuneConfig, OutputConfig, RuntimeConfig, TrackingConfig,
                                     TrainingConfig)


def finetune(step: FinetuneConfig, data: DataConfig | None = None, training: TrainingConfig | None = None,
             runtime: RuntimeConfig | None = None, tracking: TrackingConfig | None = None,
             output: OutputConfig | None = None) -> StepResult | None:
    """Fine-tune a pretrained encoder on a task with cross-entropy, making a teacher for distill.

    A group left None takes finetune's defaults (`compress finetune --help`; its lr is 5e-5). Returns the model's
    folder, metrics and MLflow run id (None on DDP ranks other than 0).
    """
    from compress.data.tasks import load_task
    from compress.engine.run import TrainConfig
    from compress.engine.teacher import finetune_model
    from compress.engine.trainer import quiet_libraries
    from compress.infra.identity import slug
    from compress.infra.writes import check_run_paths
    from compress.models.loading import check_text_classifier, load_config, resolve_max_length, resolve_model
    from compress.options.commands import with_defaults

    data, training, runtime, tracking, output = with_defaults(
        "finetune", data=data, training=training, runtime=runtime, tracking=tracking, output=output)
    quiet_libraries()
    cfg = TrainConfig(training, runtime, data.max_length)
    cfg.validate()
    task_data = load_task(data.task, data.data, text_column=data.text_column, label_column=data.label_column,
                          max_train=data.max_train, seed=training.seed, quoting=data.quoting)
    path = resolve_model(step.model, "--model")
    config = load_config(path, "--model")
    check_text_classifier(config, "--model")  # any encoder family: it may be distill's teacher
    cfg.max_length = resolve_max_length(data.max_length, [config])
    default = f"outputs/finetune-{slug(step.model)}-{slug(task_data.name)}"
    out = check_run_paths(output.output if output.output is not None else default, reads=(path, data.data),
                          tracking=tracking.tracking)
    return finetune_model(path, step.model, task_data, out, cfg, tracking, resume=output.resume,
                          overwrite=output.overwrite, params={"max_train": data.max_train})
