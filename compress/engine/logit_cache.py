"""Teacher logits on disk, keyed by everything that determines them, so a later run can skip the teacher entirely.

A distillation run with `--cache_teacher` stores the frozen teacher's logits for every training row after its first
epoch. The file's name is a hash of the teacher's weights, the training rows, the tokenizer, the truncation length
and the dtype the teacher ran in: change any of them and the key changes, so a stale file is never read. Another
run with the same teacher and data (a longer run, another student, every trial of `compress search`) finds the file
and never runs the teacher at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from compress.infra.paths import share_like_open


def tokenizer_digest(tokenizer) -> str:
    """A hash of the tokenizer's full serialisation (vocabulary, normaliser, truncation side) when it has one; of its
    class and vocabulary otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tok = backend.to_str() if backend is not None else json.dumps([type(tokenizer).__name__,
                                                                   sorted(tokenizer.get_vocab().items())])
    return hashlib.sha256(tok.encode()).hexdigest()


def cache_key(teacher_path: str, task, tokenizer, max_length: int, teacher_dtype: str) -> str:
    from compress.infra.identity import weights_identity

    parts = [str(Path(teacher_path).resolve()), weights_identity(teacher_path), task.fingerprint,
             tokenizer_digest(tokenizer), tokenizer.truncation_side, max_length, teacher_dtype]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def cache_file(root: Path, key: str) -> Path:
    return root / "logits" / f"{key[:24]}.safetensors"


def file_for_run(root: Path, teacher_path: str, task, tokenizer, cfg) -> Path:
    """The cache file of a run (a run.TrainConfig) whose frozen teacher is `teacher_path`: keyed as `cache_key`,
    with the run's --max_length and the dtype the teacher will run in."""
    from compress.engine.trainer import teacher_runs_bf16

    dtype = "bf16" if teacher_runs_bf16(cfg.runtime.accelerator, cfg.runtime.precision) else "fp32"
    return cache_file(root, cache_key(teacher_path, task, tokenizer, cfg.max_length, dtype))


def load(path: Path, rows: int, num_labels: int) -> torch.Tensor | None:
    """The stored (rows, num_labels) logits, or None when there is no usable file (a wrong shape is ignored)."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        logits = load_file(str(path))["logits"]
    except Exception:  # a truncated or foreign file is recomputed, never trusted
        return None
    return logits if tuple(logits.shape) == (rows, num_labels) else None


def save(path: Path, logits: torch.Tensor, meta: dict[str, str]) -> None:
    """Written to a temporary name and renamed, so a killed run never leaves a half-written cache behind."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({"logits": logits.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)
    share_like_open(tmp)  # the cache may be shared by a team's runs
    os.replace(tmp, path)
