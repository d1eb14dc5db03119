"""The budget of compress auto: its flags read and checked, each constraint's value for Optuna, the accuracy floor
its pruner judges checkpoints against, and which constraint binds when nothing meets them all.

A constraint's value is its relative violation, (measured - cap) / cap or (floor - score) / floor: zero or less is
met, and values of different units add up to "how far from the budget" when the closest trial is named.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from compress.infra.errors import CompressError

# the artefact a model ships as; compress export writes all three
RUNTIMES = ("onnx-int8", "onnx", "torch")
# constraint name -> the metric it judges (a trial's user attribute), the flag that sets it, and the metric's unit
CONSTRAINTS = {"latency": ("latency_ms", "--max_latency_ms", "ms p50"), "mb": ("student_mb", "--max_mb", "MB"),
               "params": ("student_params", "--max_params", "parameters"),
               "score": ("student_score", "--min_retention/--min_score", "")}


@dataclass(frozen=True)
class Budget:
    """What the shipped model must meet. `teacher_score` is filled in once the teacher is scored (the floor of
    --min_retention needs it)."""

    latency_shape: tuple[int, int]
    runtimes: tuple[str, ...]
    max_latency_ms: float | None = None
    min_retention: float | None = None
    min_score: float | None = None
    max_params: int | None = None
    max_mb: float | None = None
    latency_reps: int = 20
    teacher_score: float | None = None
    metric: str = "score"
    caps: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        caps = {"latency": self.max_latency_ms, "mb": self.max_mb, "params": self.max_params}
        object.__setattr__(self, "caps", {k: v for k, v in caps.items() if v is not None})

    @property
    def floor(self) -> float | None:
        """The lowest dev score that meets --min_score and --min_retention (of the teacher's score) together."""
        floors = [self.min_score] if self.min_score is not None else []
        if self.min_retention is not None and self.teacher_score is not None:
            floors.append(self.min_retention * self.teacher_score)
        return max(floors) if floors else None

    def with_teacher(self, score: float, metric: str) -> Budget:
        return replace(self, teacher_score=score, metric=metric)

    def text(self) -> str:
        """The budget in one line, as the flags give it."""
        parts = []
        if self.max_latency_ms is not None:
            parts.append(f"p50 <= {self.max_latency_ms:g} ms at {self.latency_shape[0]}x{self.latency_shape[1]}")
        if self.min_retention is not None:
            parts.append(f"retention >= {self.min_retention:g}")
        if self.min_score is not None:
            parts.append(f"{self.metric} >= {self.min_score:g}")
        if self.max_params is not None:
            parts.append(f"params <= {self.max_params:,}")
        if self.max_mb is not None:
            parts.append(f"MB <= {self.max_mb:g}")
        return ", ".join(parts) + f" (runtime {'/'.join(self.runtimes)})"


# --- the flags --------------------------------------------------------------------------------------------------

def parse_shape(value: str) -> tuple[int, int]:
    """'1x128' -> (1, 128): batch and tokens of the latency measurement."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(value))
    if not match or min(int(match.group(1)), int(match.group(2))) < 1:
        raise CompressError(f"--latency_shape {value}: give BATCHxTOKENS with both at least 1, e.g. 1x128")
    return int(match.group(1)), int(match.group(2))


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str | None) -> float | None:
    """'2h', '90m', '1h30m', '45s' -> seconds (None: no time budget)."""
    if value is None:
        return None
    text = str(value).strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])", text)
    if not parts or re.sub(r"\s+", "", "".join(n + u for n, u in parts)) != re.sub(r"\s+", "", text):
        raise CompressError(f"--time_budget {value}: give a duration with a unit, e.g. 2h, 90m, 1h30m or 600s")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise CompressError(f"--time_budget {value}: must be longer than 0")
    return seconds


def parse_runtime(value: str) -> tuple[str, ...]:
    """--runtime: one runtime, or auto (each trial takes the fastest of the three that meets the caps)."""
    if value == "auto":
        return RUNTIMES
    if value not in RUNTIMES:
        raise CompressError(f"--runtime {value}: use auto, {', '.join(RUNTIMES)}")
    return (value,)


def make_budget(*, max_latency_ms: float | None, latency_shape: str, min_retention: float | None,
                min_score: float | None, max_params: int | None, max_mb: float | None, runtime: str,
                latency_reps: int = 20) -> Budget:
    """Every budget flag checked, each refusal one line naming its flag; nothing is loaded."""
    from compress.options.bounds import check_all

    check_all(max_latency_ms=max_latency_ms, min_retention=min_retention, min_score=min_score,
              max_params=max_params, max_mb=max_mb, latency_reps=latency_reps)
    if min_retention is None and min_score is None:
        raise CompressError("give --min_retention (a fraction of the teacher's score, e.g. 0.97) and/or --min_score: "
                            "without an accuracy floor the smallest model is one that learned nothing")
    return Budget(latency_shape=parse_shape(latency_shape), runtimes=parse_runtime(runtime),
                  max_latency_ms=max_latency_ms, min_retention=min_retention, min_score=min_score,
                  max_params=max_params, max_mb=max_mb, latency_reps=latency_reps)


# --- judging a trial --------------------------------------------------------------------------------------------

def violations(budget: Budget, values: dict) -> dict[str, float]:
    """Each constraint whose metric is in `values`: its relative violation (<= 0: met)."""
    out = {}
    for name, cap in budget.caps.items():
        key = CONSTRAINTS[name][0]
        if values.get(key) is not None:
            out[name] = (float(values[key]) - cap) / cap
    floor = budget.floor
    if floor is not None and values.get("student_score") is not None:
        out["score"] = (floor - float(values["student_score"])) / max(abs(floor), 1e-12)
    return out


def meets(budget: Budget, values: dict) -> bool:
    """Every constraint judged, and met (a score not yet known is not met)."""
    found = violations(budget, values)
    return set(found) == set(budget.caps) | {"score"} and all(v <= 0 for v in found.values())


def distance(found: dict[str, float]) -> float:
    """How far a trial is from the budget: the sum of its relative violations."""
    return sum(max(0.0, v) for v in found.values())


def said(budget: Budget, name: str, values: dict) -> str:
    """'p50 12.3 ms > --max_latency_ms 10' for a broken constraint, from a trial's values."""
    key, flag, unit = CONSTRAINTS[name]
    value = values.get(key)
    if name == "score":
        floor = budget.floor
        why = (f"--min_retention {budget.min_retention:g} of the teacher's {budget.teacher_score:.4f}"
               if budget.min_retention is not None and budget.teacher_score is not None
               and math.isclose(floor, budget.min_retention * budget.teacher_score) else f"--min_score {floor:.4f}")
        return f"{budget.metric} {value:.4f} < {floor:.4f} ({why})"
    cap = budget.caps[name]
    shown = f"{value:,.0f}" if name == "params" else f"{value:.2f}"
    return f"{shown} {unit} > {flag} {cap:,.0f}" if name == "params" else f"{shown} {unit} > {flag} {cap:g}"


def binding(budget: Budget, judged: list[dict]) -> tuple[str, dict | None]:
    """The constraint that bound (the one the most trials broke, ties to the largest violation) and the closest
    trial, from each trial's values and violations (`judged`: dicts holding "violations")."""
    broken: dict[str, list[float]] = {}
    for row in judged:
        for name, v in row["violations"].items():
            if v > 0:
                broken.setdefault(name, []).append(v)
    if not broken:
        return "", None
    name = max(broken, key=lambda n: (len(broken[n]), max(broken[n])))
    closest = min(judged, key=lambda r: distance(r["violations"]))
    return name, closest


def set_constraints(trial, budget: Budget, values: dict) -> dict[str, float]:
    """Optuna 5's per-trial constraints (Trial.set_constraint; a sampler's constraints_func is deprecated there):
    TPE and NSGA-II read them for complete and pruned trials alike, so a trial cut before training still teaches the
    sampler where the caps are. Returns them."""
    found = violations(budget, values)
    for name, value in found.items():
        trial.set_constraint(name, value)
    return found


# --- the pruner -------------------------------------------------------------------------------------------------

def floor_pruner(floor: float | None, startup: int = 2):
    """An Optuna pruner for validation scores judged against the accuracy floor: a trial is stopped at a checkpoint
    when its score is below the floor and below the median of the other trials' scores at that checkpoint.

    The study itself minimises size, so Optuna's MedianPruner, which follows the study's direction, would stop the
    trials that score best; this one reads the reported scores as scores. A trial at or above the floor always goes
    on: it can still win.
    """
    import statistics

    import optuna
    from optuna.trial import TrialState

    class BelowFloor(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            step = trial.last_step
            if step is None or floor is None:
                return False
            value = trial.intermediate_values[step]
            if value >= floor:
                return False
            others = [t.intermediate_values[step] for t in study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                if step in t.intermediate_values]
            return len(others) >= startup and value < statistics.median(others)

    return BelowFloor()
