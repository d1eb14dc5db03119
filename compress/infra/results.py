"""What a step returns: its output, its final metrics, its MLflow run id and the lineage written beside the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepResult:
    """The result of one step, so a caller composes steps without reading compress.json back from disk."""

    output: str | None
    """the folder (or file) the step wrote, or None where it wrote nothing (evaluate without --json_out)."""
    metrics: dict[str, float]
    """every final number under the names the step logs to MLflow: student_score, teacher_score, retention,
    compression, student_params, latency_ms, speedup, student_mb, ... for a training step."""
    run_id: str | None = None
    """the MLflow run the step logged to, if any."""
    lineage: dict[str, Any] = field(default_factory=dict)
    """what compress.json beside the model holds: the command, task, metric and the models it came from."""
    report: dict[str, Any] = field(default_factory=dict)
    """the step's whole report where it has more than flat metrics (the JSON that evaluate, export and bench
    print)."""
