"""Dev-set predictions from torch or ONNX logits, so each exported file's task metric can be checked."""

from __future__ import annotations

from pathlib import Path

from compress.infra.errors import CompressError
from compress.exporting.onnx import onnx_session


def metric_value(metric: str, preds, labels) -> float:
    """GLUE's metrics on integer arrays: accuracy, F1 of class 1 (MRPC/QQP), or Matthews correlation (CoLA)."""
    import numpy as np

    preds, labels = np.asarray(preds), np.asarray(labels)
    if metric == "accuracy":
        return float((preds == labels).mean()) if len(labels) else 0.0
    if metric == "f1":
        tp = float(((preds == 1) & (labels == 1)).sum())
        wrong = float((preds != labels).sum())
        return tp / (tp + 0.5 * wrong) if tp else 0.0
    if metric == "matthews":
        k = int(max(preds.max(initial=0), labels.max(initial=0))) + 1
        confusion = np.zeros((k, k))
        np.add.at(confusion, (labels, preds), 1)
        t, p, c, s = confusion.sum(1), confusion.sum(0), np.trace(confusion), confusion.sum()
        denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
        return float((c * s - t @ p) / denom) if denom else 0.0
    raise CompressError(f"unknown metric {metric!r}")


def predict_dev(logits_fn, tokenizer, task, names: list[str], *, max_length: int, batch_size: int) -> list[int]:
    """Argmax predictions for the dev split; `logits_fn(dict of int64 numpy arrays) -> (B, C) array`."""
    import numpy as np

    preds: list[int] = []
    texts = task.dev_texts
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        first = [t[0] for t in chunk]
        second = [t[1] for t in chunk] if len(chunk[0]) > 1 else None
        enc = tokenizer(first, second, truncation=True, max_length=max_length, padding=True, return_tensors="np")
        feed = {n: np.asarray(enc[n], dtype=np.int64) if n in enc else np.zeros_like(enc["input_ids"], np.int64)
                for n in names}
        preds += np.asarray(logits_fn(feed)).argmax(-1).tolist()
    return preds


def torch_logits_fn(model):
    import torch

    def run(feed):
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.float().numpy()

    return run


def onnx_logits_fn(path: Path):
    session = onnx_session(path)
    return lambda feed: session.run(["logits"], feed)[0]
