"""The range each numeric flag must lie in, and the words each word flag takes.

Two tables, read by every command that takes the flag and by `compress search`, which checks a space's values against
them before a study opens: a bound stated once cannot drift between a command and the search over it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from compress.infra.errors import CompressError


class Bound(NamedTuple):
    ok: Callable[[float], bool]
    text: str  # completes "must be ..."
    hint: str = ""  # what the value means, where the range alone does not say


def _fraction(hint: str) -> Bound:
    return Bound(lambda v: 0 <= v < 1, "in [0, 1)", hint)


def _at_least(n: int, hint: str = "") -> Bound:
    return Bound(lambda v: v >= n, f"at least {n}", hint)


_POSITIVE = Bound(lambda v: v > 0, "> 0")
_WEIGHT = Bound(lambda v: v >= 0, ">= 0", "a loss weight")

BOUNDS: dict[str, Bound] = {
    # fractions
    **dict.fromkeys(("heads", "ffn", "hidden", "sparsity"), _fraction("the fraction to remove")),
    "warmup": _fraction("a fraction of the training steps"),
    # training
    "epochs": _at_least(1),
    "teacher_epochs": _at_least(1),
    "recover_epochs": _at_least(0, "0 skips recovery"),
    "batch_size": _at_least(1),
    "lr": _POSITIVE,
    "teacher_lr": _POSITIVE,
    "weight_decay": Bound(lambda v: v >= 0, ">= 0"),
    "max_length": Bound(lambda v: 8 <= v <= 8192, "between 8 and 8192", "tokens per example"),
    "max_train": _at_least(1),
    "num_workers": _at_least(0, "0 loads data in the main process"),
    "checkpoint_every": _at_least(0, "0 saves by time, see --checkpoint_minutes"),
    "checkpoint_minutes": _POSITIVE,
    # distillation
    "temperature": _POSITIVE,
    **dict.fromkeys(("alpha_kd", "alpha_ce", "alpha_hidden", "alpha_attn"), _WEIGHT),
    "augment": _at_least(0, "augmented copies of each training text; 0 makes none"),
    # student shapes and their inputs
    "layers": _at_least(1),
    "groups": _at_least(1),
    "embedding": _at_least(2),
    "calibration": _at_least(1, "training rows that fit the shared weights"),
    "importance_batches": _at_least(1),
    "vocab_top": _at_least(0, "corpus tokens kept beyond the training texts'"),
    "vocab_min_count": _at_least(1, "times a training token must occur to be kept"),
    # measurement
    **dict.fromkeys(("latency_reps", "latency_batch", "latency_seq"), _at_least(1)),
    # NumPy's generator, which Lightning seeds, takes 0 to 2**32 - 1; a search offsets its sampler's seed per worker
    "seed": Bound(lambda v: 0 <= v < 2**32, "between 0 and 4294967295"),
    "sampler_seed": Bound(lambda v: 0 <= v < 2**31, "between 0 and 2147483647", "each worker adds its own offset"),
    # compress auto's budget
    "max_latency_ms": Bound(lambda v: v > 0, "> 0", "p50 milliseconds at --latency_shape"),
    "min_retention": Bound(lambda v: 0 < v <= 1, "in (0, 1]", "a fraction of the teacher's dev score"),
    "min_score": Bound(lambda v: 0 < v <= 1, "in (0, 1]", "the dev score of the task's metric"),
    "max_params": _at_least(1),
    "max_mb": Bound(lambda v: v > 0, "> 0", "megabytes of the shipped file"),
}


CHOICES: dict[str, tuple[str, ...]] = {
    "criterion": ("taylor", "magnitude", "random"),
    "scope": ("layer", "global"),
    "share": ("all", "attention", "ffn"),
    "init": ("mean", "first", "regmean"),
    "accelerator": ("auto", "cpu", "cuda", "gpu"),  # gpu: Lightning's word for cuda
    "precision": ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true"),
}


def check_choice(name: str, value: str) -> None:
    """Refuse `--NAME VALUE` that is not one of the flag's words, in one line that lists them."""
    words = [w for w in CHOICES[name] if w != "gpu"]
    if value not in CHOICES[name]:
        raise CompressError(f"--{name} {value}: use {', '.join(words[:-1])} or {words[-1]}")


def finite(value: float) -> bool:
    """Not inf or nan; an int is (a 400-digit one has no float to test)."""
    return not isinstance(value, float) or math.isfinite(value)


def check(name: str, value: float | None) -> None:
    """Refuse `--NAME VALUE` outside its range, in one line that says the range (None means unset: nothing to
    check)."""
    bound = BOUNDS[name]
    if value is not None and not finite(value):  # 1e309 parses as inf, which passes "> 0"; nan passes none
        raise CompressError(f"--{name} {value}: must be a finite number")
    if value is not None and not bound.ok(value):
        shown = int(value) if isinstance(value, float) and value.is_integer() else value  # 0, as typed, not 0.0
        raise CompressError(f"--{name} {shown}: must be {bound.text}" + (f" ({bound.hint})" if bound.hint else ""))


def check_all(**values: float | None) -> None:
    """`check` for each keyword, in the order given."""
    for name, value in values.items():
        check(name, value)


def check_devices(devices: int | str) -> None:
    """Lightning checks --devices only when the Trainer is built, after the models are loaded; this runs first.
    A count (-1: all), a list of device indices such as 0,1 or 0, (a list of one), or auto."""
    text = str(devices).strip()
    if text == "auto":
        return
    if "," in text or text.startswith("["):  # Lightning reads "0,1" and "0," as device indices
        indices = [p.strip() for p in text.strip("[]").split(",") if p.strip()]
        if indices and all(p.isdigit() for p in indices) and len(set(indices)) == len(indices):
            return
    elif text.lstrip("-").isdigit() and (int(text) >= 1 or int(text) == -1):
        return
    raise CompressError(f"--devices {devices}: give a count of at least 1, -1 for all, device indices such as 0,1, "
                        "or auto")
