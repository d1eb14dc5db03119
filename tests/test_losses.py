"""compress.losses against numbers worked out by hand with math.log on tiny explicit tensors.

Convention in the comments: p = softmax(logits / T); KL(t || s) = sum_i t_i * (log t_i - log s_i).
"""

import math

import pytest
import torch

from compress import losses

LN3 = math.log(3.0)
# KL([1/4, 3/4] || [1/2, 1/2]) = 1/4 * log((1/4) / (1/2)) + 3/4 * log((3/4) / (1/2)) = 1/4 log(1/2) + 3/4 log(3/2)
KL_QUARTER_VS_HALF = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)  # = 0.1308120359...


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --- soft_target_kl ---------------------------------------------------------------------------------------------------


def test_soft_target_kl_t1_hand_value() -> None:
    # row 0: student [0, 0] -> [1/2, 1/2]; teacher [0, ln 3] -> [1/(1+3), 3/(1+3)] = [1/4, 3/4]; KL = KL_QUARTER_VS_HALF
    # row 1: student == teacher -> KL 0
    # batchmean divides the sum by B = 2; T² = 1
    student = t([[0.0, 0.0], [1.0, -2.0]])
    teacher = t([[0.0, LN3], [1.0, -2.0]])
    value = losses.soft_target_kl(student, teacher, temperature=1.0)
    assert value.ndim == 0
    assert value.item() == pytest.approx((KL_QUARTER_VS_HALF + 0.0) / 2, rel=1e-6)


def test_soft_target_kl_t2_includes_t_squared() -> None:
    # At T=2, teacher [0, 2 ln 3] / 2 = [0, ln 3] -> [1/4, 3/4] again; student [0, 0] -> [1/2, 1/2].
    # The KL of the softened distributions is the same number, and the loss is scaled by T² = 4.
    student = t([[0.0, 0.0]])
    teacher = t([[0.0, 2 * LN3]])
    value = losses.soft_target_kl(student, teacher, temperature=2.0)
    assert value.item() == pytest.approx(4 * KL_QUARTER_VS_HALF, rel=1e-6)


def test_soft_target_kl_t2_general_rows() -> None:
    # A row with no closed form, worked with math.exp/log: s = [1, 3], t = [2, -1], T = 2
    s = [1.0 / 2, 3.0 / 2]
    tt = [2.0 / 2, -1.0 / 2]
    zs = math.exp(s[0]) + math.exp(s[1])
    zt = math.exp(tt[0]) + math.exp(tt[1])
    ps = [math.exp(s[0]) / zs, math.exp(s[1]) / zs]
    pt = [math.exp(tt[0]) / zt, math.exp(tt[1]) / zt]
    kl = pt[0] * (math.log(pt[0]) - math.log(ps[0])) + pt[1] * (math.log(pt[1]) - math.log(ps[1]))
    value = losses.soft_target_kl(t([[1.0, 3.0]]), t([[2.0, -1.0]]), temperature=2.0)
    assert value.item() == pytest.approx(kl * 2 * 2, rel=1e-6)


def test_soft_target_kl_zero_when_equal_and_shift_invariant() -> None:
    logits = t([[0.3, -1.2, 2.0], [5.0, 5.0, -5.0]])
    for temperature in (1.0, 2.0, 4.0):
        assert losses.soft_target_kl(logits, logits.clone(), temperature).item() == pytest.approx(0.0, abs=1e-6)
        # softmax ignores a constant added to a row, so the loss must too
        assert losses.soft_target_kl(logits + 7.0, logits, temperature).item() == pytest.approx(0.0, abs=1e-5)


def test_soft_target_kl_is_positive_and_asymmetric() -> None:
    a, b = t([[0.0, 0.0]]), t([[0.0, LN3]])
    # KL(teacher=b || student=a) vs KL(teacher=a || student=b)
    forward = losses.soft_target_kl(a, b, 1.0).item()
    backward = losses.soft_target_kl(b, a, 1.0).item()
    # KL([1/2,1/2] || [1/4,3/4]) = 1/2 log(2) + 1/2 log(2/3)
    assert forward == pytest.approx(KL_QUARTER_VS_HALF, rel=1e-6)
    assert backward == pytest.approx(0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0), rel=1e-6)
    assert forward > 0 and backward > 0 and forward != pytest.approx(backward)


# --- hard_label_ce ----------------------------------------------------------------------------------------------------


def test_hard_label_ce_hand_value() -> None:
    # row 0: [ln 3, 0] -> [3/4, 1/4], label 0 -> -log(3/4); row 1: [0, 0] -> [1/2, 1/2], label 1 -> -log(1/2)
    value = losses.hard_label_ce(t([[LN3, 0.0], [0.0, 0.0]]), torch.tensor([0, 1]))
    assert value.ndim == 0
    assert value.item() == pytest.approx((-math.log(0.75) - math.log(0.5)) / 2, rel=1e-6)


def test_hard_label_ce_wrong_label_costs_more() -> None:
    logits = t([[LN3, 0.0]])
    assert losses.hard_label_ce(logits, torch.tensor([1])).item() == pytest.approx(-math.log(0.25), rel=1e-6)


def test_hard_label_ce_averages_over_labelled_rows_only() -> None:
    # rows 0 and 2 are labelled: -log(3/4) and -log(1/2), mean over those two; row 1 (soft-only) is not read at all
    logits = t([[LN3, 0.0], [5.0, -5.0], [0.0, 0.0]])
    labelled = torch.tensor([True, False, True])
    value = losses.hard_label_ce(logits, torch.tensor([0, 1, 1]), labelled)
    assert value.item() == pytest.approx((-math.log(0.75) - math.log(0.5)) / 2, rel=1e-6)
    assert losses.hard_label_ce(logits, torch.tensor([0, 0, 1]), labelled).item() == value.item()
    none = losses.hard_label_ce(logits, torch.tensor([0, 1, 1]), torch.tensor([False, False, False]))
    assert none.item() == 0.0  # a batch of soft-only rows: no cross-entropy, and no nan


# --- hidden_cosine ----------------------------------------------------------------------------------------------------


def test_hidden_cosine_hand_value_with_mask() -> None:
    # B=2, S=2, H=2; mask [[1, 1], [1, 0]] -> three real tokens
    # (0,0): [1,0] vs [1,0]  cos 1         -> 0
    # (0,1): [1,1] vs [1,0]  cos 1/sqrt 2  -> 1 - 1/sqrt(2)
    # (1,0): [0,1] vs [1,0]  cos 0         -> 1
    # (1,1): padding, ignored
    student = t([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [5.0, -3.0]]])
    teacher = t([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 2.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])
    value = losses.hidden_cosine(student, teacher, mask)
    expected = (0.0 + (1 - 1 / math.sqrt(2)) + 1.0) / 3  # mean over real tokens, not over B*S = 4
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_hidden_cosine_ignores_padding_and_scale() -> None:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 8, generator=g)
    teacher = torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    base = losses.hidden_cosine(student, teacher, mask)
    changed_s, changed_t = student.clone(), teacher.clone()
    changed_s[0, 3:] = torch.randn(2, 8, generator=g) * 100
    changed_t[0, 3:] = -changed_s[0, 3:]  # padded pairs now point in opposite directions: would add 2 each
    assert losses.hidden_cosine(changed_s, changed_t, mask).item() == pytest.approx(base.item(), abs=1e-6)
    # cosine does not care about length
    assert losses.hidden_cosine(student * 3.0, teacher, mask).item() == pytest.approx(base.item(), abs=1e-6)
    assert losses.hidden_cosine(student, student.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)


# --- hidden_mse -------------------------------------------------------------------------------------------------------


def test_hidden_mse_hand_value_with_mask() -> None:
    # B=1, S=3, H=2; the third token is padding
    # token 0: ([1,2] - [0,0])² = [1, 4] -> mean 2.5
    # token 1: ([3,4] - [3,2])² = [0, 4] -> mean 2
    # mean over 2 real tokens: 2.25
    student = t([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
    teacher = t([[[0.0, 0.0], [3.0, 2.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert losses.hidden_mse(student, teacher, mask).item() == pytest.approx(2.25, rel=1e-6)
    student[0, 2] = torch.tensor([-100.0, 100.0])  # padding changes nothing
    assert losses.hidden_mse(student, teacher, mask).item() == pytest.approx(2.25, rel=1e-6)


def test_hidden_mse_zero_when_equal() -> None:
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(1))
    assert losses.hidden_mse(x, x.clone(), torch.ones(2, 4)).item() == 0.0


# --- text_vector_mse --------------------------------------------------------------------------------------------------


def test_text_vector_mse_hand_value() -> None:
    # row 0: (1 - 0)^2 and (2 - 0)^2; row 1: equal; mean over 2 rows x 2 units = (1 + 4 + 0 + 0) / 4
    student = t([[1.0, 2.0], [3.0, -1.0]])
    teacher = t([[0.0, 0.0], [3.0, -1.0]])
    assert losses.text_vector_mse(student, teacher).item() == pytest.approx(1.25, rel=1e-6)
    assert losses.text_vector_mse(teacher, teacher).item() == 0.0


# --- attention_kl -----------------------------------------------------------------------------------------------------


def test_attention_kl_zero_when_equal() -> None:
    attn = torch.softmax(torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(2)), dim=-1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert losses.attention_kl(attn, attn.clone(), mask).item() == pytest.approx(0.0, abs=1e-7)


def test_attention_kl_hand_value() -> None:
    # B=1, A=1, S=2. Query row 0: teacher [1/2, 1/2], student [1/2, 1/2] -> 0.
    # Query row 1: teacher [1/4, 3/4], student [1/2, 1/2] -> KL_QUARTER_VS_HALF. Mean over 2 real queries.
    teacher = t([[[[0.5, 0.5], [0.25, 0.75]]]])
    student = t([[[[0.5, 0.5], [0.5, 0.5]]]])
    value = losses.attention_kl(student, teacher, torch.tensor([[1, 1]]))
    assert value.item() == pytest.approx(KL_QUARTER_VS_HALF / 2, rel=1e-6)


def test_attention_kl_averages_over_heads_and_batch() -> None:
    # B=2, A=2, S=1 (one query, two keys). Per (b, head): KL values
    # (0,0): t [1/4,3/4] s [1/2,1/2] -> K;  (0,1): equal -> 0;  (1,0): equal -> 0;  (1,1): t [1/2,1/2] s [1/4,3/4]
    # -> 1/2 log(2) + 1/2 log(2/3). Mean over heads, then over the 2 real queries.
    q, h = [0.25, 0.75], [0.5, 0.5]
    teacher = t([[[q], [h]], [[h], [h]]])
    student = t([[[h], [h]], [[h], [q]]])
    reverse = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    expected = ((KL_QUARTER_VS_HALF + 0) / 2 + (0 + reverse) / 2) / 2
    value = losses.attention_kl(student, teacher, torch.tensor([[1], [1]]))
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_attention_kl_ignores_masked_queries() -> None:
    # Query row 1 is padding: whatever the student does there must not count.
    teacher = t([[[[0.5, 0.5], [0.25, 0.75]]]])
    student = t([[[[0.5, 0.5], [0.99, 0.01]]]])
    mask = torch.tensor([[1, 0]])
    assert losses.attention_kl(student, teacher, mask).item() == pytest.approx(0.0, abs=1e-7)
    student2 = t([[[[0.25, 0.75], [0.5, 0.5]]]])
    # only row 0 counts now: KL([1/2,1/2] || [1/4,3/4]), divided by 1 real query
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert losses.attention_kl(student2, teacher, mask).item() == pytest.approx(expected, rel=1e-6)


def test_attention_kl_zero_probabilities_are_finite() -> None:
    # A masked key has probability exactly 0 in both; 0 * log 0 must count as 0, not nan.
    teacher = t([[[[1.0, 0.0], [0.25, 0.75]]]])
    student = t([[[[1.0, 0.0], [0.25, 0.75]]]])
    value = losses.attention_kl(student, teacher, torch.tensor([[1, 1]]))
    assert torch.isfinite(value) and value.item() == pytest.approx(0.0, abs=1e-7)


def test_attention_kl_head_count_mismatch_averages_heads_first() -> None:
    # Teacher has 2 heads, student 1. Teacher heads on the one query: [1/2, 1/2] and [0, 1] -> mean [1/4, 3/4].
    teacher = t([[[[0.5, 0.5]], [[0.0, 1.0]]]])  # (B=1, A=2, S=1, S=... keys 2)
    student = t([[[[0.5, 0.5]]]])  # (1, 1, 1, 2)
    mask = torch.tensor([[1]])
    assert losses.attention_kl(student, teacher, mask).item() == pytest.approx(KL_QUARTER_VS_HALF, rel=1e-6)
    # and when the student matches the head average, the loss is 0 although it matches neither head
    student_avg = t([[[[0.25, 0.75]]]])
    assert losses.attention_kl(student_avg, teacher, mask).item() == pytest.approx(0.0, abs=1e-7)


def test_attention_kl_head_mismatch_student_wider() -> None:
    # Student 4 heads whose average is [1/2, 1/2]; teacher 2 heads averaging [1/4, 3/4].
    student = t([[[[1.0, 0.0]], [[0.0, 1.0]], [[0.5, 0.5]], [[0.5, 0.5]]]])
    teacher = t([[[[0.5, 0.5]], [[0.0, 1.0]]]])
    value = losses.attention_kl(student, teacher, torch.tensor([[1]]))
    assert value.item() == pytest.approx(KL_QUARTER_VS_HALF, rel=1e-6)


@pytest.mark.parametrize("fn", [losses.soft_target_kl, losses.hard_label_ce])
def test_logit_losses_have_gradients(fn) -> None:
    student = torch.zeros(2, 2, requires_grad=True)
    args = (t([[0.0, LN3], [1.0, 0.0]]), 2.0) if fn is losses.soft_target_kl else (torch.tensor([0, 1]),)
    fn(student, *args).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
