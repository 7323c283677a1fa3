"""Loss values against hand-computed references (tiny tensors, worked out by hand or with explicit loops); the CoSS
head against the reference's ``wrapper.py`` (Linear -> ReLU -> Linear) and the CoSS supplement's BN variant
(section 4, eq. 1 and the MSE loss) against an explicit batch-normalisation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.student.losses import (
    BatchNormHead,
    CossHead,
    LinearHead,
    cosine_loss,
    coss_bn_loss,
    coss_loss,
    kdep_loss,
)
from pipeline.student.specs import LossSpec
from pipeline.student.training import Student, compute_loss


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


def test_coss_head_is_the_reference_mlp_and_the_bn_head_is_a_named_option():
    """coss-pytorch wrapper.py: Linear(D_s, 2048) -> ReLU -> Linear(2048, D_t), no normalisation."""
    head = CossHead(8, 16)
    assert [type(m) for m in head.net] == [nn.Linear, nn.ReLU, nn.Linear]
    assert head.net[0].weight.shape == (2048, 8) and head.net[2].weight.shape == (16, 2048)
    s = torch.randn(4, 8)
    first, last = head.net[0], head.net[2]
    want = torch.relu(s @ first.weight.T + first.bias) @ last.weight.T + last.bias
    torch.testing.assert_close(head(s), want)
    bn = CossHead(8, 16, hidden=32, kind="mlp-bn")
    assert [type(m) for m in bn.net] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    with pytest.raises(ValueError, match="not one of mlp, mlp-bn"):
        CossHead(8, 16, kind="bn")


def test_coss_bn_variant_by_hand():
    """Z_:,i = gamma_i (X_:,i - mu_i) / sqrt(var_i + eps) + beta_i (batch statistics, biased variance, eps 1e-5),
    then L = (1/B) sum_b mean_i (Z_bi - T_bi)^2."""
    s = torch.tensor([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0], [7.0, 2.0]])
    t = torch.tensor([[0.0, 1.0], [1.0, -1.0], [2.0, 0.5], [-1.0, 0.0]])
    head = BatchNormHead(2, 2)
    assert isinstance(head.embed, nn.Identity) and head.bn.affine
    with torch.no_grad():
        head.bn.weight.copy_(torch.tensor([2.0, 0.5]))
        head.bn.bias.copy_(torch.tensor([1.0, -1.0]))
    gamma, beta = (2.0, 0.5), (1.0, -1.0)
    # column 0: mean 4, biased var 5; column 1: mean 2, biased var 2
    mean, var = (4.0, 2.0), (5.0, 2.0)
    z = [[gamma[i] * (float(s[b, i]) - mean[i]) / math.sqrt(var[i] + 1e-5) + beta[i] for i in range(2)]
         for b in range(4)]  # fmt: skip
    want = sum((z[b][i] - float(t[b, i])) ** 2 for b in range(4) for i in range(2)) / 8
    out = head.train()(s).detach()
    torch.testing.assert_close(out, torch.tensor(z), atol=1e-6, rtol=0)
    loss, parts = coss_bn_loss(out, t)
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(parts["mse"]) == pytest.approx(want, rel=1e-6)
    dispatched, _ = compute_loss(
        LossSpec("coss-bn"), out, t
    )  # unweighted: the supplement's D is the plain MSE
    assert float(dispatched) == pytest.approx(want, rel=1e-6)
    wider = BatchNormHead(8, 16, kind="mlp")  # D_s != D_t: the CoSS head first, then the BN
    assert isinstance(wider.embed, CossHead) and wider.bn.num_features == 16


def test_students_build_the_chosen_coss_head():
    """ResNet-18 post-ReLU (512) to a 2048-d teacher: coss gets the reference MLP unless mlp-bn is asked for;
    coss-bn puts the affine BN after it (or alone when the widths agree)."""
    reference = Student("resnet18", "post_relu", "coss", 2048, 32).head
    assert isinstance(reference, CossHead) and reference.kind == "mlp"
    assert Student("resnet18", "post_relu", "coss", 2048, 32, coss_head="mlp-bn").head.kind == "mlp-bn"
    assert isinstance(Student("resnet18", "post_relu", "coss", 512, 32).head, nn.Identity)
    same = Student("resnet18", "post_relu", "coss-bn", 512, 32).head
    assert isinstance(same, BatchNormHead) and isinstance(same.embed, nn.Identity)
    wide = Student("resnet18", "post_relu", "coss-bn", 2048, 32, coss_head="mlp").head
    assert isinstance(wide.embed, CossHead) and wide.embed.kind == "mlp"
