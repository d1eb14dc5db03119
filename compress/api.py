"""compress's Python API: one function per step, each taking config groups and returning a StepResult.

    import compress
    from compress.api import DataConfig, DistillConfig, TrainingConfig

    result = compress.distill(DistillConfig(teacher="minilm-l6", layers=3), DataConfig(task="bbc-news"),
                              training=TrainingConfig(epochs=1))
    result.metrics["retention"], result.output, result.run_id

A group left None takes the command's defaults, the same as its flags' (`compress distill --help`). The commands are
thin adapters over these functions; compress search runs its trials through them.
"""

from compress.engine.run import RunHooks
from compress.infra.results import StepResult
from compress.options.groups import (AutoConfig, BenchConfig, DataConfig, DistillConfig, EvaluateConfig,
                                     ExportConfig, FinetuneConfig, LossConfig, OutputConfig, PruneConfig,
                                     RuntimeConfig, SearchConfig, ShareConfig, TrackingConfig, TrainingConfig)
from compress.search.auto import AutoResult, auto
from compress.search.run import search
from compress.steps.bench import bench
from compress.steps.distill import distill
from compress.steps.evaluate import evaluate
from compress.steps.export import export
from compress.steps.finetune import finetune
from compress.steps.prune import prune
from compress.steps.share import share

__all__ = ["AutoConfig", "AutoResult", "BenchConfig", "DataConfig", "DistillConfig", "EvaluateConfig", "ExportConfig",
           "FinetuneConfig", "LossConfig", "OutputConfig", "PruneConfig", "RunHooks", "RuntimeConfig", "SearchConfig",
           "ShareConfig", "StepResult", "TrackingConfig", "TrainingConfig", "auto", "bench", "distill", "evaluate",
           "export", "finetune", "prune", "search", "share"]
