"""Loss values against hand-computed references (tiny tensors, worked out by hand or with explicit loops)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.student.losses import CossHead, LinearHead, cosine_loss, coss_loss, kdep_loss


def test_kdep_loss_is_weighted_mean_squared_error():
    s = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    t = torch.tensor([[0.0, 2.0], [2.0, 1.0]])
    loss, parts = kdep_loss(s, t, weight=3.0)
    # squared errors 1, 0, 4, 4 -> mean 9/4; times w = 3
    assert float(loss) == pytest.approx(3 * 9 / 4)
    assert parts["mse"] == pytest.approx(9 / 4)


def test_cosine_loss():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    loss, parts = cosine_loss(s, t)
    assert parts["cos"] == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    assert float(loss) == pytest.approx(1 - (1 + 1 / math.sqrt(2)) / 2)


def test_coss_loss_matches_explicit_loops():
    s = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    b, d = s.shape

    def unit(v):
        return [x / math.sqrt(sum(y * y for y in v)) for x in v]

    rows = [
        sum(a * c for a, c in zip(unit(t[i].tolist()), unit(s[i].tolist()), strict=True)) for i in range(b)
    ]
    cols = [
        sum(a * c for a, c in zip(unit(t[:, j].tolist()), unit(s[:, j].tolist()), strict=True))
        for j in range(d)
    ]
    l_co, l_ss = -sum(rows) / b, -sum(cols) / d
    loss, parts = coss_loss(s, t, l0=1.0, l1=0.5, tau_t=0.07, tau_s=0.1, beta=2.0)
    assert parts["l_co"] == pytest.approx(l_co) and parts["l_ss"] == pytest.approx(l_ss)
    assert float(loss) == pytest.approx(2.0 * (l_co + 0.5 * l_ss) / (0.07 * 0.1))
    perfect, _ = coss_loss(t, t)  # identical features: both terms are -1
    assert float(perfect) == pytest.approx(-2 / (0.07 * 0.1))


def test_coss_zero_vectors_do_not_divide_by_zero():
    loss, _ = coss_loss(torch.zeros(2, 3), torch.ones(2, 3))
    assert torch.isfinite(loss) and float(loss) == 0.0


def test_heads_map_student_width_to_teacher_width():
    s = torch.randn(4, 8)
    assert CossHead(8, 16, hidden=32)(s).shape == (4, 16)
    pre, post = LinearHead(8, 16, after_relu=False), LinearHead(8, 16, after_relu=True)
    post.load_state_dict(pre.state_dict())
    neg = -torch.rand(4, 8) - 0.1  # all negative: after the ReLU the input is zero, BN gives its bias
    torch.testing.assert_close(
        post.eval()(neg), post.proj[1].bias.expand(4, 16) - 0 * neg[:, :1], atol=1e-5, rtol=0
    )
    assert not torch.allclose(pre.eval()(neg), post(neg))
