"""The LightningModule every command trains with: distillation from a frozen teacher, or plain fine-tuning.

With `teacher=None` it is ordinary cross-entropy fine-tuning (how `compress finetune` makes a teacher), so
fine-tuning, distillation, and the recovery steps of prune and share share one training step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from compress.engine import logit_cache
from compress import losses
from compress.models import masks
from compress.options.groups import LossConfig, TrainingConfig


def build_metric(metric: str, num_labels: int):
    import torchmetrics

    if metric == "accuracy":
        return torchmetrics.Accuracy(task="multiclass", num_classes=num_labels)
    if metric == "f1":  # GLUE's MRPC/QQP F1 is the positive class's, not a macro average
        return torchmetrics.F1Score(task="binary")
    if metric == "matthews":
        return torchmetrics.MatthewsCorrCoef(task="multiclass", num_classes=num_labels)
    raise ValueError(f"unknown metric {metric}")


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """For student hidden state k (1..N_s), the teacher hidden state it learns from: k * N_t // N_s.

    The last student layer always meets the teacher's last layer, whose output the classifier reads.
    """
    return [k * teacher_layers // student_layers for k in range(1, student_layers + 1)]


class DistillModule(pl.LightningModule):
    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        *,
        num_labels: int,
        metric: str = "accuracy",
        loss: LossConfig | None = None,
        training: TrainingConfig | None = None,
        cache_file: Path | None = None,
        compile: bool = False,
        shared_tokens: bool = True,
    ) -> None:
        """`loss` weighs the terms (None: its defaults; with no teacher, cross-entropy alone at weight 1); `training`
        gives AdamW's lr, weight decay and warmup. `shared_tokens=False`: the teacher tokenizes differently (batches
        carry its own encoding as teacher_*), so the hidden-state loss compares one vector per text and attention
        transfer, token to token, cannot be had."""
        super().__init__()
        self.student = student
        # A teacher placed over devices by accelerate (`--teacher_device_map`) stays out of the module tree: Lightning
        # would otherwise move it to the student's device, which is what it is too large for, or wrap it for DDP.
        self.teacher_placed = teacher is not None and bool(getattr(teacher, "hf_device_map", None))
        if self.teacher_placed:
            object.__setattr__(self, "teacher", teacher)
        else:
            self.teacher = teacher
        self.weights = loss or LossConfig()
        training = training or TrainingConfig()
        self.temperature = self.weights.temperature
        self.lr, self.weight_decay, self.warmup = training.lr, training.weight_decay, training.warmup
        # Teacher logits per training row, filled during the first epoch and used after it (the teacher is
        # frozen and in eval mode, so its outputs are a pure function of the row). Only logits: hidden states
        # for every row would not fit in memory, so the hidden and attention losses keep the teacher live.
        self.cache_teacher = self.weights.cache_teacher and teacher is not None
        if self.cache_teacher and (self.weights.alpha_hidden or self.weights.alpha_attn):
            raise ValueError("teacher caching stores logits only; it needs the hidden and attention weights at 0")
        self._cache: torch.Tensor | None = None  # (N, C)
        self._cached: torch.Tensor | None = None  # (N,) bool: row's logits are stored
        self._cache_ready = False
        # Where the complete cache is stored and looked for (compress.logit_cache): a run that finds it never runs
        # the teacher, not even in its first epoch.
        self.cache_file = cache_file if self.cache_teacher else None
        self._compile = compile
        self._teacher_fp32: dict[str, torch.Tensor] | None = None  # the exact weights while the teacher runs in bf16
        self.save_hyperparameters(
            {"num_labels": num_labels, "metric": metric, "temperature": self.temperature, "lr": self.lr,
             "weight_decay": self.weight_decay, "warmup": self.warmup, "shared_tokens": shared_tokens,
             **self.weights.alphas()}
        )
        self.val_metric = build_metric(metric, num_labels)
        self.projections = None
        self.layer_map: list[int] = []
        self.shared_tokens = shared_tokens
        if not shared_tokens and self.weights.alpha_attn:
            raise ValueError("attention transfer matches token to token; the teacher tokenizes differently")
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            s_cfg, t_cfg = student.config, teacher.config
            self.layer_map = uniform_layer_map(s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
            # another family's states live in another basis even at the same width: always learn the map to them
            if self.weights.alpha_hidden and (s_cfg.hidden_size != t_cfg.hidden_size or not shared_tokens):
                # A learned map up to the teacher's width, one per matched layer (TinyBERT's W_h); trained with the
                # student and discarded after, so the exported student keeps its own width.
                self.projections = nn.ModuleList(
                    nn.Linear(s_cfg.hidden_size, t_cfg.hidden_size) for _ in self.layer_map
                )
                kept = getattr(student, "hidden_kept", None)
                if shared_tokens and kept is not None and len(kept) == s_cfg.hidden_size:
                    # A width-pruned student's dimension i is its parent's dimension kept[i] (slice_hidden), so
                    # each map starts as that placement rather than at random: the loss then pulls the kept
                    # dimensions back toward the parent's from the first step.
                    with torch.no_grad():
                        for projection in self.projections:
                            projection.weight.zero_()
                            projection.weight[kept, range(len(kept))] = 1.0
                            projection.bias.zero_()
        # The frozen teacher is rebuilt from its folder on resume; keeping it out of checkpoints saves its size.
        self.strict_loading = False

    # --- the teacher never trains: Lightning's model.train() must not switch its dropout on
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    def on_fit_start(self) -> None:
        # The frozen teacher needs no fp32 master weights: under bf16 precision it runs in bf16 outright, halving its
        # memory traffic. That is the GPU default; on a CPU, auto precision is 32-true and this fires only when bf16
        # is asked for (training.teacher_runs_bf16 is the same rule, for the logit cache's key).
        # (A placed teacher was loaded in bf16 already; it cannot be cast or compiled as a whole.)
        live_teacher = self.teacher if not self.teacher_placed else None
        if live_teacher is not None and "bf16" in str(self.trainer.precision):
            if self.trainer.is_global_zero:
                # Rank 0 scores the teacher after training, and bf16 rounding is not undone by .float(): it keeps
                # the exact weights on the CPU and puts them back at the end, so teacher_score is the teacher's own.
                self._teacher_fp32 = {k: v.detach().to("cpu", copy=True) for k, v in live_teacher.state_dict().items()}
            live_teacher.to(torch.bfloat16)
        if self._compile:
            # In-place nn.Module.compile keeps parameter names, so checkpoints and the saved student are unchanged.
            # dynamic=True: dynamic padding gives every batch its own length, which would otherwise recompile.
            for model in (self.student, live_teacher):
                if model is not None:
                    model.compile(dynamic=True)

    def on_fit_end(self) -> None:
        # Scoring, latency and export run the plain eager modules (on the CPU for export), not the compiled graphs.
        for model in (self.student, self.teacher):
            if model is not None:
                model._compiled_call_impl = None
        if self._teacher_fp32 is not None:
            self.teacher.float().load_state_dict(self._teacher_fp32)
            self._teacher_fp32 = None

    def on_train_start(self) -> None:
        if self.cache_teacher and self._cache is None:
            rows = len(self.trainer.train_dataloader.dataset)
            stored = logit_cache.load(self.cache_file, rows, self.hparams.num_labels) if self.cache_file else None
            if stored is not None:
                print(f"teacher logits: read from {self.cache_file}; the teacher is not run", file=sys.stderr)
                self._cache = stored.to(self.device)
                self._cached = torch.ones(rows, dtype=torch.bool, device=self.device)
                self._cache_ready = True
                return
            self._cache = torch.zeros(rows, self.hparams.num_labels, device=self.device)
            self._cached = torch.zeros(rows, dtype=torch.bool, device=self.device)

    def on_train_epoch_end(self) -> None:
        if not self.cache_teacher or self._cache_ready:
            return
        # DDP ranks each saw a different shard: pool what they stored (rows seen twice average to themselves)
        filled = self._cached.float()
        total = self.trainer.strategy.reduce(self._cache * filled[:, None], reduce_op="sum")
        count = self.trainer.strategy.reduce(filled, reduce_op="sum")
        self._cache = total / count.clamp_min(1.0)[:, None]
        self._cached = count > 0
        self._cache_ready = bool(self._cached.all())  # one host sync per epoch, not per step
        if self._cache_ready and self.cache_file is not None and self.trainer.is_global_zero:
            logit_cache.save(self.cache_file, self._cache, {"rows": str(self._cache.shape[0])})
            print(f"teacher logits cached in {self.cache_file}; later epochs and runs skip the teacher",
                  file=sys.stderr)

    def teacher_logits(self, batch: dict, want_hidden: bool, want_attn: bool):
        """Teacher outputs for this batch: from the cache once it is complete, else a live forward pass."""
        if self.cache_teacher and self._cache_ready and self.training:
            return None, self._cache[batch["idx"]]
        own = "teacher_" if "teacher_input_ids" in batch else ""  # the teacher's own encoding, where it has one
        with torch.no_grad():
            out = self.teacher(**self._inputs(batch, self.teacher, own), output_hidden_states=want_hidden,
                               output_attentions=want_attn)
        logits = out.logits.to(self.device)  # a placed teacher may answer from another device; else a no-op
        if self.cache_teacher and self.training and self._cache is not None:
            self._cache[batch["idx"]] = logits.float()
            self._cached[batch["idx"]] = True
        return out, logits

    # --- the step
    @staticmethod
    def _inputs(batch: dict, model: nn.Module, prefix: str = "") -> dict:
        # The collator says whether it padded ("padded"), so the mask reaches each model in a form that transformers
        # does not have to inspect on the GPU (compress.masks). `prefix` "teacher_" picks the teacher's own encoding.
        inputs = {k: batch[prefix + k] for k in ("input_ids", "token_type_ids") if prefix + k in batch}
        if prefix + "attention_mask" in batch:
            inputs["attention_mask"] = masks.for_model(model, batch[prefix + "attention_mask"],
                                                       batch.get(prefix + "padded"))
        return inputs

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Each weighted-in loss term by name; 'loss' is their weighted sum."""
        w = self.weights
        distilling = self.teacher is not None
        want_hidden = distilling and w.alpha_hidden > 0
        want_attn = distilling and w.alpha_attn > 0
        out = self.student(**self._inputs(batch, self.student), output_hidden_states=want_hidden,
                           output_attentions=want_attn)
        terms: dict[str, torch.Tensor] = {}
        if not distilling or w.alpha_ce:
            terms["ce"] = losses.hard_label_ce(out.logits, batch["labels"], batch.get("labelled"))
        if distilling:
            t_out, t_logits = self.teacher_logits(batch, want_hidden, want_attn)
            if w.alpha_kd:
                terms["kd"] = losses.soft_target_kl(out.logits, t_logits, self.temperature)
            mask = batch["attention_mask"]  # (B, S) 1/0: the losses average over real tokens
            if want_hidden:
                pairs = [(out.hidden_states[k + 1], t_out.hidden_states[t].to(self.device))
                         for k, t in enumerate(self.layer_map)]
                if not self.shared_tokens:  # (B, S_s, H_s) and (B, S_t, H_t): their first tokens, one per text
                    per_layer = [losses.text_vector_mse(p(s[:, 0]), t[:, 0])
                                 for p, (s, t) in zip(self.projections, pairs)]
                elif self.projections is None:
                    per_layer = [losses.hidden_cosine(s, t, mask) for s, t in pairs]
                else:
                    per_layer = [losses.hidden_mse(p(s), t, mask) for p, (s, t) in zip(self.projections, pairs)]
                terms["hidden"] = torch.stack(per_layer).mean()
            if want_attn:
                per_layer = [
                    losses.attention_kl(out.attentions[k], t_out.attentions[t - 1].to(self.device), mask)
                    for k, t in enumerate(self.layer_map)
                ]
                terms["attn"] = torch.stack(per_layer).mean()
        weight = {"ce": w.alpha_ce if distilling else 1.0, "kd": w.alpha_kd, "hidden": w.alpha_hidden,
                  "attn": w.alpha_attn}
        terms["loss"] = sum(weight[k] * v for k, v in terms.items())
        return terms

    def shows_step_loss(self) -> bool:
        """A per-step loss in the progress bar costs a host sync every step (the bar calls .item()), which stalls a
        GPU; on a CPU it is free, so it is shown there only."""
        return self.device.type != "cuda"

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.compute_losses(batch)
        size = batch["labels"].shape[0]
        # Epoch means accumulate on the device and are averaged over DDP ranks once per epoch.
        epoch_means = {f"loss_{k}": v for k, v in terms.items() if k != "loss"} | {"loss_epoch": terms["loss"]}
        self.log_dict(epoch_means, on_step=False, on_epoch=True, sync_dist=True, batch_size=size)
        if self.shows_step_loss():
            self.log("loss_step", terms["loss"], on_step=True, on_epoch=False, prog_bar=True, batch_size=size)
        return terms["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.student(**self._inputs(batch, self.student)).logits
        self.log("val_loss", losses.hard_label_ce(logits, batch["labels"]), batch_size=batch["labels"].shape[0],
                 sync_dist=True)
        preds = logits.argmax(dim=-1)
        self.val_metric.update(preds, batch["labels"])
        self.log("val_score", self.val_metric, prog_bar=True)

    def configure_optimizers(self):
        from transformers import get_linear_schedule_with_warmup

        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith("teacher.")]
        # no decay on biases and LayerNorm weights, as in BERT's own recipe
        no_decay = [p for n, p in trainable if p.ndim < 2]
        decay = [p for n, p in trainable if p.ndim >= 2]
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.device.type == "cuda"  # one kernel for all params on a GPU; not available on CPU tensors
        optimizer = torch.optim.AdamW(groups, lr=self.lr, fused=fused)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_linear_schedule_with_warmup(optimizer, int(self.warmup * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
