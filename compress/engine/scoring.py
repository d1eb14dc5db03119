"""A model's task metric on the dev set, on the run's device and precision or where accelerate placed it."""

from __future__ import annotations

import lightning.pytorch as pl
import torch


def score(model, datamodule, metric: str, num_labels: int, accelerator: str, precision: str) -> float:
    """The task metric of `model` on the dev split, through the same validation step training uses."""
    from compress.engine.distill_module import DistillModule

    module = DistillModule(model, num_labels=num_labels, metric=metric)
    trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=precision, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    result = trainer.validate(module, datamodule=datamodule, verbose=False)
    return float(result[0]["val_score"])


@torch.inference_mode()
def score_in_place(model, datamodule, metric: str, num_labels: int) -> float:
    """`score` for a model accelerate placed over devices: Lightning would move it, which it refuses (offloaded
    layers live on the meta device). Inputs go to its first layer's device; its hooks carry them on from there."""
    from compress.engine.distill_module import build_metric

    first = next(iter(model.hf_device_map.values()))
    device = torch.device(f"cuda:{first}" if isinstance(first, int) else "cpu" if first == "disk" else first)
    values = build_metric(metric, num_labels)
    model.eval()
    for batch in datamodule.val_dataloader():
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        values.update(model(**inputs).logits.argmax(dim=-1).cpu(), batch["labels"])
    return float(values.compute())
