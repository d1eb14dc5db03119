"""Distillation losses as pure functions. Shapes: B batch, S sequence, C classes, H hidden, A heads.

Each returns a scalar tensor; weighting and summing them is the training module's job.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher_T || student_T) * T², Hinton et al. 2015.

    The T² keeps the gradient's scale independent of T, so the soft term's weight means the same at any T.
    student_logits, teacher_logits: (B, C)
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)  # (B, C)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)  # (B, C)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t


def hard_label_ce(student_logits: torch.Tensor, labels: torch.Tensor,
                  labelled: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy against the gold labels, averaged over the rows that have one.

    student_logits: (B, C), labels: (B,) int64; labelled: (B,) bool, False where a row trains on soft targets only
    (unlabelled text, augmented copies) and its label is a placeholder (None: every row is labelled). The mean is over
    labelled rows, so --alpha_ce weighs the labels alike however much soft-only text a batch holds; none gives 0.
    """
    if labelled is None:
        return F.cross_entropy(student_logits.float(), labels)
    per_row = F.cross_entropy(student_logits.float(), labels, reduction="none")  # (B,)
    mask = labelled.to(per_row.dtype)  # (B,)
    return (per_row * mask).sum() / mask.sum().clamp_min(1.0)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # values: (B, S), mask: (B, S) of 0/1; padding must not dilute or bias the average
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def hidden_cosine(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - cos(student, teacher) per token, averaged over real tokens (DistilBERT's L_cos).

    student_hidden, teacher_hidden: (B, S, H) at the same width; mask: (B, S)
    """
    cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)  # (B, S)
    return _masked_mean(1.0 - cos, mask)


def hidden_mse(projected_student: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per hidden unit over real tokens (TinyBERT's hidden loss).

    projected_student: (B, S, H_teacher), already mapped up from a narrower student; teacher_hidden: (B, S, H);
    mask: (B, S)
    """
    sq = (projected_student.float() - teacher_hidden.float()).pow(2).mean(dim=-1)  # (B, S)
    return _masked_mean(sq, mask)


def text_vector_mse(projected_student: torch.Tensor, teacher_vector: torch.Tensor) -> torch.Tensor:
    """Mean squared error per hidden unit between one vector per text (the first token's state, [CLS] or <s>).

    The hidden-state loss between models that tokenize differently: their tokens do not line up, their texts do.
    projected_student: (B, H_teacher), mapped up through a learned projection; teacher_vector: (B, H_teacher)
    """
    return (projected_student.float() - teacher_vector.float()).pow(2).mean()


def attention_kl(student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) between attention distributions, per query row, over real query tokens.

    student_attn: (B, A_s, S, S), teacher_attn: (B, A_t, S, S), rows already softmaxed (eager attention).
    When head counts differ, both are averaged over heads first, so any student can learn where to look.
    mask: (B, S)
    """
    if student_attn.shape[1] != teacher_attn.shape[1]:
        student_attn = student_attn.mean(dim=1, keepdim=True)  # (B, 1, S, S)
        teacher_attn = teacher_attn.mean(dim=1, keepdim=True)
    eps = 1e-12  # masked keys have probability 0; log(0) would give nan in 0 * log 0
    s, t = student_attn.float(), teacher_attn.float()
    kl = (t * ((t + eps).log() - (s + eps).log())).sum(dim=-1)  # (B, A, S)
    return _masked_mean(kl.mean(dim=1), mask)
