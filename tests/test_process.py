"""DistPro's search (pipeline/process) against references: the alpha step equals DARTS' unrolled gradient written out
by hand (exact, by differentiating through the virtual step, and as the same finite difference), with heavy-ball
and Nesterov momentum, and a numerical derivative of the unrolled objective (through batch norm too); the hcl
pathway loss equals hand-computed values; the official connector block has its parameter count; pre-ReLU stage taps
and maps equal torchvision's ``layerK.<last>.add`` nodes; softmax weights
sum to 1 at every step; the process file round-trips and is refused for a pair whose pathways differ; alpha_at
interpolates and the threshold drops exactly the pathways below it; GAP of the online stage maps equals the cached
stage taps of a tiny random-init teacher, so online and cached pathways see the same numbers; the stage end to end
on tiny data (cached mode fast, online mode slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader

from pipeline.cache.join import rebuild_teacher
from pipeline.cache.store import open_store
from pipeline.data.shards import list_shards
from pipeline.manifest import ConfigError
from pipeline.process.artefact import (
    Pathway,
    Process,
    ProcessError,
    alpha_at,
    check_fits,
    kept_at,
    kept_fraction,
    kept_pathways,
    load_process,
    make_pathways,
    pathway_pairs,
    read_process,
)
from pipeline.process.batches import SearchSpec, SearchStream, held_out
from pipeline.process.online import StageMaps, pooled
from pipeline.process.search import (
    Architect,
    Batch,
    ProcessSearch,
    hypergradient,
    momentum_buffers,
    network_step,
    search_loop,
    virtual_step,
)
from pipeline.process.unrolled import val_loss
from stages.cache_teacher import CacheTeacherConfig
from stages.cache_teacher import run as cache_run
from stages.config import SearchProcessConfig
from stages.search_process import run as search_run

STAGES = ("stage1", "stage2", "stage3", "stage4")
STAGES_PRE = ("stage1_pre", "stage2_pre", "stage3_pre", "stage4_pre")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread here: on 2 shared cores, 2 threads made ResNet-18 steps ~30x slower (oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyStudent(nn.Module):
    """Two linear stages with a tanh between: {stage1: (B, 3), stage2: (B, 2)}."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False)

    def forward(self, x):
        h1 = torch.tanh(self.l1(x))
        return {"stage1": h1, "stage2": self.l2(h1)}


def _tiny(seed: int = 0) -> tuple[ProcessSearch, Batch, Batch]:
    """2 pathways (teacher stage 2 <- student stages 1 and 2, linear blocks), CE head with 3 classes, float64."""
    torch.manual_seed(seed)
    pathways = [Pathway(2, 1, 5, 3), Pathway(2, 2, 5, 2)]
    model = ProcessSearch(TinyStudent(), pathways, "linear", "ce", (2, 3)).double()
    with torch.no_grad():
        model.alpha.copy_(torch.tensor([0.3, -0.2]))

    def batch(n: int) -> Batch:
        return Batch(torch.randn(n, 4, dtype=torch.float64), {"stage2": torch.randn(n, 5, dtype=torch.float64)},
                     torch.randint(0, 3, (n,)))  # fmt: skip

    return model, batch(6), batch(5)


def _losses(p: dict, alpha: torch.Tensor, b: Batch, val: bool) -> torch.Tensor:
    """L_train / L_val of the tiny model, written out with plain tensor ops (independent of ProcessSearch)."""
    h1 = torch.tanh(b.x @ p["student.l1.weight"].T)
    h2 = h1 @ p["student.l2.weight"].T
    ce = F.cross_entropy(h2 @ p["head.weight"].T + p["head.bias"], b.labels)
    if val:
        return ce
    t = b.targets["stage2"]
    m1 = ((h1 @ p["transforms.t2-s1.linear.weight"].T + p["transforms.t2-s1.linear.bias"] - t) ** 2).mean()
    m2 = ((h2 @ p["transforms.t2-s2.linear.weight"].T + p["transforms.t2-s2.linear.bias"] - t) ** 2).mean()
    a = torch.softmax(alpha, 0)
    return ce + a[0] * m1 + a[1] * m2


def _sgd_with_momentum(model: ProcessSearch, train: Batch, lr: float, wd: float) -> torch.optim.SGD:
    """SGD after one real step, so momentum buffers exist and enter the virtual step."""
    opt = torch.optim.SGD(model.weight_parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    task, losses = model(train.x, train.targets, train.labels)
    model.train_objective(task, losses, model.alpha.detach()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.alpha.grad = None
    return opt


def _virtual_by_hand(w: dict, buf: dict, alpha: torch.Tensor, train: Batch, xi: float, wd: float, nesterov: bool,
                     create_graph: bool = True) -> dict:  # fmt: skip
    """torch.optim.SGD's next weights (momentum 0.9, dampening 0), written out: d = g + wd w, b = 0.9 buf + d,
    w - xi (d + 0.9 b) with Nesterov, else w - xi b."""
    leaves = {n: p.clone().requires_grad_() for n, p in w.items()}
    grads = torch.autograd.grad(
        _losses(leaves, alpha, train, False), list(leaves.values()), create_graph=create_graph
    )
    out = {}
    for (n, p), g in zip(leaves.items(), grads, strict=True):
        d = g + wd * p
        b = 0.9 * buf[n] + d
        out[n] = p - xi * (d + 0.9 * b if nesterov else b)
    return out


def _by_hand(model: ProcessSearch, opt, train: Batch, val: Batch, xi: float, wd: float, radius: float | None,
             nesterov: bool = False):  # fmt: skip
    """DARTS' unrolled alpha gradient: exact (radius None: autograd through w'(alpha)) or the finite difference."""
    w = {n: p.detach().clone() for n, p in model.named_parameters() if n != "alpha"}
    buf = {n: b if b is not None else torch.zeros_like(w[n]) for n, b in momentum_buffers(model, opt).items()}
    alpha = model.alpha.detach().clone().requires_grad_()
    virtual = _virtual_by_hand(w, buf, alpha, train, xi, wd, nesterov)
    if radius is None:  # d L_val(w'(alpha)) / d alpha, w fixed
        return torch.autograd.grad(_losses(virtual, alpha, val, True), alpha)[0]
    fixed = {n: p.detach().requires_grad_() for n, p in virtual.items()}
    v = torch.autograd.grad(_losses(fixed, alpha, val, True), list(fixed.values()), allow_unused=True)
    v = [torch.zeros_like(p) if g is None else g for g, p in zip(v, fixed.values(), strict=True)]  # blocks: 0
    eps = radius / torch.sqrt(sum((g**2).sum() for g in v))
    plus = {n: w[n] + eps * g for n, g in zip(w, v, strict=True)}
    minus = {n: w[n] - eps * g for n, g in zip(w, v, strict=True)}
    g_plus = torch.autograd.grad(_losses(plus, alpha, train, False), alpha)[0]
    g_minus = torch.autograd.grad(_losses(minus, alpha, train, False), alpha)[0]
    return -xi * (1.9 if nesterov else 1.0) * (g_plus - g_minus) / (2 * eps)


def test_the_alpha_step_equals_the_hand_computed_unrolled_gradient():
    model, train, val = _tiny()
    xi, wd = 0.3, 1e-3
    opt = _sgd_with_momentum(model, train, xi, wd)
    buffers = momentum_buffers(model, opt)
    args = (model, train, val, xi, 0.9, wd, buffers)
    # the same finite difference (DARTS' r = 0.01), written out by hand
    ours, _ = hypergradient(*args, radius=0.01, method="finite-difference")
    assert torch.allclose(ours, _by_hand(model, opt, train, val, xi, wd, 0.01), atol=1e-10)
    # the exact unrolled gradient; a small radius makes the central difference exact to O(r^2)
    exact = _by_hand(model, opt, train, val, xi, wd, None)
    fine, _ = hypergradient(*args, radius=1e-4, method="finite-difference")
    assert exact.abs().max() > 1e-4  # a real signal, not two zeros
    assert torch.allclose(fine, exact, atol=1e-6)
    # the architect feeds that gradient to Adam (betas 0.5, 0.999) and leaves the weights alone
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n != "alpha"}
    reference = model.alpha.detach().clone().requires_grad_()
    adam = torch.optim.Adam([reference], lr=0.05, betas=(0.5, 0.999))
    reference.grad = ours.clone()
    adam.step()
    Architect(model, opt, alpha_lr=0.05, method="finite-difference").step(train, val)
    assert torch.allclose(model.alpha.detach(), reference.detach(), atol=1e-12)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n != "alpha")


@pytest.mark.parametrize("nesterov", [False, True])
def test_the_exact_alpha_step_is_autograd_through_the_unrolled_step(nesterov):
    """exact = d L_val(w'(alpha)) / d alpha through the optimiser's own virtual step (by hand, with autograd), and a
    central difference of that unrolled objective in alpha (float64, no double backward) agrees to 1e-8; DARTS'
    finite difference approaches it as r shrinks (with Nesterov, its implicit term carries the factor 1 + m)."""
    model, train, val = _tiny()
    xi, wd = 0.3, 1e-3
    opt = _sgd_with_momentum(model, train, xi, wd)
    for group in opt.param_groups:
        group["nesterov"] = nesterov  # the architect reads the flag from the optimiser
    buffers = momentum_buffers(model, opt)
    args = (model, train, val, xi, 0.9, wd, buffers)
    exact, _ = hypergradient(*args, method="exact", nesterov=nesterov)
    by_hand = _by_hand(model, opt, train, val, xi, wd, None, nesterov)
    assert exact.abs().max() > 1e-4
    torch.testing.assert_close(exact, by_hand, rtol=0, atol=1e-13)
    w = {n: p.detach().clone() for n, p in model.named_parameters() if n != "alpha"}
    buf = {n: b for n, b in buffers.items()}

    def unrolled(a: torch.Tensor) -> float:
        virtual = _virtual_by_hand(w, buf, a, train, xi, wd, nesterov, create_graph=False)
        return float(_losses({n: v.detach() for n, v in virtual.items()}, a, val, True))

    h, a0 = 1e-5, model.alpha.detach().clone()
    numeric = torch.tensor([(unrolled(a0 + h * e) - unrolled(a0 - h * e)) / (2 * h) for e in torch.eye(2)])
    torch.testing.assert_close(exact, numeric.double(), rtol=1e-6, atol=1e-9)
    fine, _ = hypergradient(*args, radius=1e-4, method="finite-difference", nesterov=nesterov)
    torch.testing.assert_close(fine, exact, rtol=1e-4, atol=1e-9)
    other, _ = hypergradient(*args, method="exact", nesterov=not nesterov)
    assert (other - exact).abs().max() > 1e-5  # the momentum rule matters: the test can tell them apart
    before = model.alpha.detach().clone()
    reference = before.clone().requires_grad_()
    adam = torch.optim.Adam([reference], lr=0.05, betas=(0.5, 0.999))
    reference.grad = exact.clone()
    adam.step()
    Architect(model, opt, alpha_lr=0.05).step(train, val)  # exact by default, Nesterov from the optimiser
    torch.testing.assert_close(model.alpha.detach(), reference.detach(), rtol=0, atol=1e-12)


def test_the_exact_alpha_step_through_batch_norm_matches_a_numerical_derivative():
    """mlp blocks (BatchNorm1d in training mode): the double backward through the virtual step against a central
    difference of L_val(w'(alpha)) in alpha, float64; at DARTS' r = 0.01 the finite difference is measurably off."""
    torch.manual_seed(0)
    model = ProcessSearch(
        TinyStudent(), [Pathway(2, 1, 5, 3), Pathway(2, 2, 5, 2)], "mlp", "regress", (2, 5), 8
    )
    model = model.double()
    with torch.no_grad():
        model.alpha.copy_(torch.tensor([0.4, -0.3]))
    g = torch.Generator().manual_seed(1)
    make = lambda n: Batch(torch.randn(n, 4, generator=g, dtype=torch.float64),  # noqa: E731
                           {"stage2": torch.randn(n, 5, generator=g, dtype=torch.float64)})  # fmt: skip
    train, val = make(8), make(8)
    opt = torch.optim.SGD(model.weight_parameters(), lr=0.5, momentum=0.9, nesterov=True)
    network_step(model, opt, train)
    buffers = momentum_buffers(model, opt)
    exact, _ = hypergradient(model, train, val, 0.5, 0.9, 0.0, buffers, method="exact", nesterov=True)

    def unrolled(a: torch.Tensor) -> float:
        w = virtual_step(model, train, 0.5, 0.9, 0.0, buffers, nesterov=True, alpha=a)
        return float(val_loss(model, w, a, val))

    h, a0 = 1e-5, model.alpha.detach().clone()
    numeric = torch.tensor([(unrolled(a0 + h * e) - unrolled(a0 - h * e)) / (2 * h) for e in torch.eye(2)])
    assert exact.abs().max() > 1e-4
    torch.testing.assert_close(exact, numeric.double(), rtol=1e-6, atol=1e-10)
    coarse, _ = hypergradient(model, train, val, 0.5, 0.9, 0.0, buffers, radius=0.01, method="finite-difference",
                              nesterov=True)  # fmt: skip
    assert float((coarse - exact).norm() / exact.norm()) > 1e-4  # an approximation, not the gradient


def test_hcl_equals_hand_computed_values():
    """hcl (the official loss): (mse + sum_k 2^-k mse of P_{l_k}) / (1 + sum_k 2^-k), levels (4, 2, 1) below H.
    A single 1 in a zero map against zeros: 2 x 2 (level 1 only): (1/4 + (1/4)^2 / 2) / 1.5 = 0.1875;
    4 x 4 (levels 2, 1): (1/16 + (1/4)^2 / 4 / 2 + (1/16)^2 / 4) / 1.75 = 0.0712890625 / 1.75;
    8 x 8 (levels 4, 2, 1): (1/64 + (1/4)^2 / 16 / 2 + (1/16)^2 / 4 / 4 + (1/64)^2 / 8) / 1.875 = 0.009521484375;
    1 x 1 maps and pooled rows: the MSE."""
    from pipeline.process.blocks import hcl_loss, pathway_loss

    def one_hot(size: int) -> torch.Tensor:
        x = torch.zeros(1, 1, size, size, dtype=torch.float64)
        x[0, 0, 0, 0] = 1.0
        return x

    assert float(hcl_loss(one_hot(2), torch.zeros(1, 1, 2, 2))) == pytest.approx(0.1875, abs=1e-15)
    assert float(hcl_loss(one_hot(4), torch.zeros(1, 1, 4, 4))) == pytest.approx(
        0.0712890625 / 1.75, abs=1e-15
    )
    assert float(hcl_loss(one_hot(8), torch.zeros(1, 1, 8, 8))) == pytest.approx(0.009521484375, abs=1e-15)
    s, t = torch.randn(3, 5, 1, 1), torch.randn(3, 5, 1, 1)
    assert torch.equal(hcl_loss(s, t), F.mse_loss(s, t))
    assert torch.equal(
        pathway_loss("hcl", s.flatten(1), t.flatten(1)), F.mse_loss(s.flatten(1), t.flatten(1))
    )
    assert float(pathway_loss("mse", one_hot(8), torch.zeros(1, 1, 8, 8))) == pytest.approx(1 / 64)
    with pytest.raises(ProcessError, match="pathway loss 'l1'"):
        pathway_loss("l1", s, t)


def test_the_reference_connector_has_the_official_parameter_count():
    """bytedance/DistPro build_feature_connector_complex for C_s = 128 -> C_t = 512 (m = 128): three bias-free 3x3
    convs 9 (128 m + m m + m 512), a bias-free Conv1x1(m, 1) gate, three BNs 2 (m + m + 512): 886,400; ours
    (``conv``) has 607,488."""
    from pipeline.process.blocks import ConvReferenceTransform, ConvTransform, transform_block

    m = 128
    official = 9 * (128 * m + m * m + m * 512) + m + 2 * (m + m + 512)
    block = transform_block("conv-reference", 128, 512)
    assert isinstance(block, ConvReferenceTransform)
    assert sum(p.numel() for p in block.parameters()) == official == 886_400
    assert sum(p.numel() for p in ConvTransform(128, 512).parameters()) == 607_488
    out = block(torch.randn(2, 128, 8, 8), (4, 4))
    assert out.shape == (2, 512, 4, 4)
    convs = [c for c in block.modules() if isinstance(c, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3), (1, 1), (3, 3), (3, 3)] and all(
        c.bias is None for c in convs
    )
    wide = ConvReferenceTransform(2048, 1024)  # m capped at 512
    assert wide.head[0].out_channels == 512 and wide.tail[0].out_channels == 1024


def test_first_order_gives_alpha_no_gradient_when_the_held_out_loss_ignores_it():
    model, train, val = _tiny()
    grad, loss = hypergradient(model, train, val, 0.3, order="first")
    assert torch.equal(grad, torch.zeros(2, dtype=torch.float64)) and loss > 0


def test_batch_norm_running_stats_are_untouched_by_the_architect():
    torch.manual_seed(0)
    model = ProcessSearch(
        TinyStudent(), [Pathway(2, 1, 5, 3), Pathway(2, 2, 5, 2)], "mlp", "regress", (2, 5), 8
    )
    b = Batch(torch.randn(6, 4), {"stage2": torch.randn(6, 5)})
    stats = {n: t.clone() for n, t in model.named_buffers()}
    opt = torch.optim.SGD(model.weight_parameters(), lr=0.1, momentum=0.9)
    Architect(model, opt, 0.1).step(b, b)
    assert all(torch.equal(t, stats[n]) for n, t in model.named_buffers())


def _loop(steps: int = 6) -> tuple[ProcessSearch, object]:
    model, train, val = _tiny()
    opt = torch.optim.SGD(model.weight_parameters(), lr=0.2, momentum=0.9)
    arch = Architect(model, opt, alpha_lr=0.1)
    record = search_loop(model, opt, arch, lambda e: [train] * 3, iter([val] * 100), epochs=2, total_steps=steps,
                         lr_at_step=lambda s: 0.2, device=torch.device("cpu"))  # fmt: skip
    return model, record


def test_search_records_softmax_weights_that_sum_to_one_at_every_step():
    model, record = _loop()
    process = Process(pathways=[p.to_dict() for p in model.pathways], logits=np.asarray(record.logits))
    assert process.steps == 6 and len(record.epochs) == 2 and record.epochs[-1]["step"] == 6
    assert np.allclose(process.weights.sum(1), 1.0, atol=1e-12)
    assert not np.allclose(process.logits[0], process.logits[-1])  # alpha moved
    assert len(record.train_loss) == len(record.val_loss) == 6


def _process(logits, stages: int = 2, pathway_set: str = "paper") -> Process:
    dims = {f"stage{k}": 4 * k for k in range(1, stages + 1)}
    pathways = make_pathways(dims, dims, pathway_set)
    return Process(pathways=[p.to_dict() for p in pathways], logits=np.asarray(logits, np.float64),
                   pathway_set=pathway_set, stages={"teacher": stages, "student": stages})  # fmt: skip


def test_pathway_sets_have_ten_pathways_for_four_stages():
    assert len(pathway_pairs(4, "paper")) == len(pathway_pairs(4, "reference")) == 10
    assert all(j <= i for i, j in pathway_pairs(4, "paper"))
    assert all(j >= i for i, j in pathway_pairs(4, "reference"))
    with pytest.raises(ProcessError, match="same number of stages"):
        make_pathways({"stage1": 4, "stage2": 8}, {"stage1": 4, "stage2": 8, "stage3": 9})


def test_the_process_file_round_trips_and_is_refused_for_a_pair_it_does_not_fit(tmp_path):
    process = _process(np.random.default_rng(0).normal(size=(5, 3)))
    path = process.save(tmp_path / "process.json")
    back = load_process(path, student_taps=("stage1", "stage2", "pooled"), teacher_taps=("stage1", "stage2"))
    assert back.names == ["t1-s1", "t2-s1", "t2-s2"]
    assert np.array_equal(back.logits, process.logits) and back.stages == process.stages
    with pytest.raises(
        ProcessError, match="searched for 2 teacher and 2 student stages; this pair has 4 and 4"
    ):
        check_fits(back, STAGES, STAGES)
    with pytest.raises(ProcessError, match="this pair has 2 and 1"):
        load_process(path, student_taps=("stage1",), teacher_taps=("stage1", "stage2"))
    data = json.loads(path.read_text())
    data["alpha"]["weights"][2][0] += 0.1
    (tmp_path / "edited.json").write_text(json.dumps(data))
    with pytest.raises(ProcessError, match="not the softmax of its logits"):
        read_process(tmp_path / "edited.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "kdep-projection/1"}))
    with pytest.raises(ProcessError, match="is not 'kdep-process/1'"):
        read_process(tmp_path / "other.json")
    with pytest.raises(ProcessError, match="run `kdep search-process` first"):
        read_process(tmp_path / "missing.json")


def test_alpha_at_interpolates_the_weights_over_training_progress():
    process = _process([[0.0, 0.0, 0.0], [1.0, 0.0, -1.0], [2.0, 0.0, -2.0]])
    w = process.weights
    assert list(alpha_at(process, 0.0).values()) == pytest.approx(w[0].tolist())
    assert list(alpha_at(process, 1.0).values()) == pytest.approx(w[2].tolist())
    assert list(alpha_at(process, 0.25).values()) == pytest.approx(((w[0] + w[1]) / 2).tolist())
    assert sum(alpha_at(process, 0.7).values()) == pytest.approx(1.0)
    with pytest.raises(ProcessError, match=r"must be in \[0, 1\]"):
        alpha_at(process, 1.5)


def test_the_threshold_drops_exactly_the_pathways_below_it():
    # normalised alpha (weight / max of the step): step 0 (1, 1, 1); step 1 (1, e^-1, e^-3)
    process = _process([[0.0, 0.0, 0.0], [0.0, -1.0, -3.0]])
    assert kept_pathways(process, 0.0) == ["t1-s1", "t2-s1", "t2-s2"]
    # the uniform initial row (step 0, every pathway at 1) does not count: only the searched steps do
    assert kept_pathways(process, 1.0) == ["t1-s1"]
    assert kept_pathways(process, 0.3) == ["t1-s1", "t2-s1"]  # e^-1 = 0.37 stays, e^-3 = 0.05 goes
    assert kept_at(process, 1.0, 0.3) == ["t1-s1", "t2-s1"]
    assert kept_at(process, 1.0, 0.4) == ["t1-s1"]
    assert kept_fraction(process, 0.3) == pytest.approx(2 / 3)
    late = _process([[0.0, -1.0, -3.0], [0.0, -0.5, -4.0], [0.0, -2.0, -4.0]])
    assert kept_pathways(late, 0.3) == ["t1-s1", "t2-s1"]  # t2-s1 reaches 0.61 at step 1; t2-s2 never 0.3
    with pytest.raises(ProcessError, match="threshold"):
        kept_pathways(process, -0.1)


def test_the_held_out_split_is_a_seeded_key_hash():
    keys = [f"img{i:05d}" for i in range(4000)]
    share = np.mean([held_out(k, 0, 0.2) for k in keys])
    assert 0.17 < share < 0.23
    assert [held_out(k, 0, 0.2) for k in keys] == [held_out(k, 0, 0.2) for k in keys]
    assert [held_out(k, 0, 0.2) for k in keys] != [held_out(k, 1, 0.2) for k in keys]


def test_config_refuses_a_transform_that_does_not_fit_the_mode():
    for spatial in ("conv", "conv-reference"):
        with pytest.raises(ConfigError, match="does not fit mode 'cached'"):
            SearchProcessConfig(cache="c", out="o", transform=spatial)
    with pytest.raises(ConfigError, match="does not fit mode 'online'"):
        SearchProcessConfig(cache="c", out="o", mode="online", transform="mlp")
    with pytest.raises(ConfigError, match="val_fraction"):
        SearchProcessConfig(cache="c", out="o", val_fraction=0.0)
    with pytest.raises(ConfigError, match="key 'nesterov'"):
        SearchProcessConfig(cache="c", out="o", momentum=0.0)
    assert SearchProcessConfig(cache="c", out="o", mode="online").transform_kind == "conv-reference"
    assert SearchProcessConfig(cache="c", out="o").transform_kind == "mlp"


@pytest.fixture(scope="module")
def staged(demo_shards, tmp_path_factory):
    """A tiny cache of a random-init ResNet-18 teacher's four pooled stage taps (2 views at 32 px)."""
    d = tmp_path_factory.mktemp("process")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), d / "teacher.pt")
    cache_run(CacheTeacherConfig(shards=str(demo_shards["train"]), out=str(d / "cache"), teacher="resnet18",
                                 weights=str(d / "teacher.pt"), taps=STAGES, views=2, resolution=32, batch_size=6,
                                 workers=0, device="cpu", dtype="float32", quiet=True))  # fmt: skip
    return {"dir": d, "cache": d / "cache", "shards": demo_shards["train"]}


def test_gap_of_online_stage_maps_equals_the_cached_stage_taps(staged):
    paths = tuple(s.path for s in list_shards(staged["shards"]))
    spec = SearchSpec(str(staged["cache"]), paths, STAGES, 32, seed=0, val_fraction=0.2, labels=True)
    x, rows, labels = next(iter(DataLoader(SearchStream(spec, "train", 0), batch_size=8)))
    teacher = rebuild_teacher(open_store(staged["cache"]))
    with torch.no_grad():
        maps = StageMaps(teacher.model.eval())(teacher.normalize(x))
    assert [tuple(m.shape[1:]) for m in maps.values()] == [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]
    online = pooled(maps)
    for tap in STAGES:
        torch.testing.assert_close(online[tap], rows[tap], rtol=1e-4, atol=1e-5)
    # so the pooled (cached-mode) pathways see the same losses from either source
    torch.manual_seed(1)
    student = StageMaps(torchvision.models.resnet18())
    dims = {t: int(online[t].shape[1]) for t in STAGES}
    model = ProcessSearch(student, make_pathways(dims, dims), "mlp", "ce", (512, 4), hidden=16).eval()
    with torch.no_grad():
        cached = model(x, dict(rows), labels)[1]
        live = model(x, online, labels)[1]
    torch.testing.assert_close(cached, live, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_pre_relu_stage_maps_pool_to_the_pre_relu_stage_taps(arch):
    """StageMaps(features="pre_relu") (FX add nodes, ReLUs out of place) pools to FeatureTaps' stageK_pre, which
    run_taps computes by hand: two independent routes; a ResNet's pre-ReLU maps hold negative values."""
    from pipeline.models import FeatureTaps

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = StageMaps(model, "pre_relu")(x)
        taps = FeatureTaps(model, STAGES_PRE)(x)
        post = pooled(StageMaps(model)(x))
    assert list(maps) == list(STAGES_PRE)
    for tap in STAGES_PRE:
        torch.testing.assert_close(pooled(maps)[tap], taps[tap], rtol=1e-5, atol=1e-6)
    if arch == "resnet18":
        assert all((m < 0).any() for m in maps.values())
        assert not torch.allclose(pooled(maps)["stage2_pre"], post["stage2"])
    else:  # linear bottlenecks: the stage outputs themselves
        assert all(torch.equal(pooled(maps)[f"{t}_pre"], post[t]) for t in STAGES)


def test_pre_relu_stage_maps_and_taps_are_refused_for_timm_models():
    timm = pytest.importorskip("timm")
    from pipeline.models import FeatureTaps, ModelError

    model = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    with pytest.raises(ProcessError, match="pre-ReLU stage maps are defined for torchvision ResNets"):
        StageMaps(model, "pre_relu")
    with pytest.raises(
        ModelError, match="stage1_pre tap .* is defined for torchvision ResNets and MobileNetV2"
    ):
        FeatureTaps(model, ("stage1_pre",))


def test_timm_stage_maps_pool_to_the_models_stage_taps():
    timm = pytest.importorskip("timm")
    from pipeline.models import FeatureTaps

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = pooled(StageMaps(model)(x))
        taps = FeatureTaps(model, STAGES)(x)
    for tap in STAGES:
        torch.testing.assert_close(maps[tap], taps[tap])


def _search_config(staged, out, **kw) -> SearchProcessConfig:
    base = dict(cache=str(staged["cache"]), out=str(out), student="resnet18", epochs=2, batch_size=4, hidden=16,
                workers=0, device="cpu", quiet=True)  # fmt: skip
    return SearchProcessConfig(**{**base, **kw})


def test_the_stage_searches_a_process_from_the_cache_end_to_end(staged, tmp_path):
    result = search_run(_search_config(staged, tmp_path / "p", batch_size=6, val_fraction=0.3))
    process = load_process(result.path, student_taps=STAGES, teacher_taps=STAGES)
    assert len(process.names) == 10 and process.names[-1] == "t4-s4"
    assert process.steps == len(process.losses["train"]) == 2 * (process.split["train"] // 6) > 0
    assert np.allclose(process.weights.sum(1), 1.0)
    assert not np.allclose(process.logits[0], process.logits[-1])
    assert process.search["objective"] == "ce" and process.search["classes"] == 4
    assert process.split["train"] + process.split["val"] == 24 and process.split["val"] > 0
    assert process.transform["kind"] == "mlp" and len(process.epochs) == 2
    assert process.transform["loss"]["name"] == "hcl" and process.stage_features == "output"
    search = (
        process.search
    )  # the defaults: the official code's choices where well defined, exact alpha gradient
    assert (search["nesterov"], search["lr_schedule"], search["hypergradient"], search["fd_radius"]) == (
        True, "constant", "exact", None)  # fmt: skip
    assert (
        search["virtual_step"] == "SGD with Nesterov momentum"
        and search["reference_code"]["pathway_loss"] == "hcl"
    )
    assert process.provenance["cache_fingerprint"] == open_store(staged["cache"]).fingerprint()
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "p" / "config.search_process.json").is_file()
    regress = search_run(_search_config(staged, tmp_path / "r", objective="regress", max_steps=1))
    assert regress.process.search["objective"] == "regress" and regress.process.steps == 1
    today = search_run(_search_config(staged, tmp_path / "t", max_steps=2, hypergradient="finite-difference",
                                      nesterov=False, lr_schedule="cosine", pathway_loss="mse"))  # fmt: skip
    s = today.process.search
    assert (s["hypergradient"], s["fd_radius"], s["nesterov"], s["lr_schedule"], s["pathway_loss"]) == (
        "finite-difference", 0.01, False, "cosine", "mse")  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"no stage1_pre\.\.stage4_pre; cache them with .*stage1_pre,stage2_pre"
    ):
        search_run(_search_config(staged, tmp_path / "p", stage_features="pre_relu"))


@pytest.fixture(scope="module")
def staged_pre(staged, demo_shards):
    """The staged teacher's pre-ReLU stage taps (stage1_pre..stage4_pre), 2 views at 32 px."""
    out = staged["dir"] / "cache-pre"
    cache_run(CacheTeacherConfig(shards=str(demo_shards["train"]), out=str(out), teacher="resnet18",
                                 weights=str(staged["dir"] / "teacher.pt"), taps=STAGES_PRE, views=2, resolution=32,
                                 batch_size=6, workers=0, device="cpu", dtype="float32", quiet=True))  # fmt: skip
    return {**staged, "cache": out}


def test_a_pre_relu_process_is_searched_on_pre_relu_taps_and_retrained_on_them(staged_pre, tmp_path):
    """stage_features pre_relu: pathways between stageK_pre taps (the official code's choice), cached rows equal the
    live teacher's pre-ReLU maps pooled, and the retrain regresses the student's stageK_pre on the cached ones."""
    paths = tuple(s.path for s in list_shards(staged_pre["shards"]))
    spec = SearchSpec(str(staged_pre["cache"]), paths, STAGES_PRE, 32, seed=0, val_fraction=0.2, labels=True)
    x, rows, _ = next(iter(DataLoader(SearchStream(spec, "train", 0), batch_size=8)))
    teacher = rebuild_teacher(open_store(staged_pre["cache"]))
    with torch.no_grad():
        live = pooled(StageMaps(teacher.model.eval(), "pre_relu")(teacher.normalize(x)))
    for tap in STAGES_PRE:
        torch.testing.assert_close(live[tap], rows[tap], rtol=1e-4, atol=1e-5)
    result = search_run(_search_config(staged_pre, tmp_path / "p", stage_features="pre_relu", max_steps=2))
    process = load_process(result.path, student_taps=STAGES_PRE, teacher_taps=STAGES_PRE)
    assert process.stage_features == "pre_relu" and process.pathways[-1]["teacher_tap"] == "stage4_pre"
    with pytest.raises(ProcessError, match="student pre-ReLU .stageK_pre. stages; this pair has 0 and 0"):
        check_fits(process, STAGES, STAGES)
    _train(staged_pre, tmp_path / "run", result.path, epochs=1, max_steps=1)
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert [t["name"] for t in prov["targets"]][-1] == "stage4_pre=stage4_pre"
    assert prov["process"]["stage_features"] == "pre_relu"


@pytest.mark.slow
def test_the_stage_searches_with_the_online_teacher_on_spatial_maps(staged, tmp_path):
    result = search_run(_search_config(staged, tmp_path / "o", mode="online", max_steps=3))
    process = result.process
    assert process.transform["kind"] == "conv-reference" and process.steps == 3
    assert process.transform["loss"]["name"] == "hcl"
    assert [p["teacher_dim"] for p in process.pathways][-1] == 512
    assert np.allclose(process.weights.sum(1), 1.0)
    assert not np.allclose(process.logits[0], process.logits[-1])
    pre = search_run(_search_config(staged, tmp_path / "pre", mode="online", max_steps=2, transform="conv",
                                    stage_features="pre_relu", hypergradient="finite-difference"))  # fmt: skip
    assert pre.process.pathways[0]["teacher_tap"] == "stage1_pre" and pre.process.transform["kind"] == "conv"


@pytest.fixture(scope="module")
def searched(staged, tmp_path_factory):
    out = tmp_path_factory.mktemp("searched")
    return search_run(_search_config(staged, out, batch_size=6, epochs=1, val_fraction=0.3)).path


def _train(staged, out, process, **kw):
    from stages.train_student import TrainStudentConfig
    from stages.train_student import run as train_run

    base = dict(cache=str(staged["cache"]), out=str(out), student=("resnet18",), loss="distpro", process=str(process),
                epochs=2, batch_size=6, lr=0.05, workers=0, device="cpu", quiet=True, log_every=1)  # fmt: skip
    return train_run(TrainStudentConfig(**{**base, **kw}))


def test_train_student_follows_the_process_alpha_and_drops_the_pathways_below_the_threshold(
    staged, searched, tmp_path
):
    import json

    from pipeline.process.artefact import alpha_at, kept_pathways, normalised, searched_rows

    process = load_process(searched)
    threshold = float(np.sort(searched_rows(process).max(axis=0))[4])  # a threshold that drops the 4 weakest
    kept = kept_pathways(process, threshold)
    assert 0 < len(kept) < 10
    _train(staged, tmp_path / "run", searched, alpha_threshold=threshold)
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    by_name = {p["name"]: p for p in process.pathways}
    assert [t["name"] for t in prov["targets"]] == [
        f"{by_name[n]['student_tap']}={by_name[n]['teacher_tap']}" for n in kept
    ]
    assert prov["process"]["kept"] == kept and len(prov["process"]["dropped"]) == 10 - len(kept)
    assert prov["process"]["transferred"] is False and prov["process"]["alpha_threshold"] == threshold
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    per_epoch = 24 * 1 // 6  # the cache's 24 images, batch 6, one rank
    for record in steps:
        epoch, within = record["epoch"], record["step"] - record["epoch"] * per_epoch
        progress = (epoch + within / per_epoch) / 2
        alpha = alpha_at(process, progress)
        # between two search steps each weight is interpolated, with 0 where the pathway is under the threshold
        low = [
            alpha[n] if normalised(process)[:, process.names.index(n)].min() >= threshold else 0.0
            for n in kept
        ]
        assert all(w <= alpha[n] + 1e-9 for w, n in zip(record["weights"], kept, strict=True))
        assert all(w >= lo - 1e-9 for w, lo in zip(record["weights"], low, strict=True))
        if threshold == 0:
            assert record["weights"] == pytest.approx([alpha[n] for n in kept])


def test_train_student_with_threshold_zero_weights_every_pathway_by_its_alpha(staged, searched, tmp_path):
    import json

    from pipeline.process.artefact import alpha_at

    process = load_process(searched)
    _train(staged, tmp_path / "run", searched, epochs=1, max_steps=2)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps[0]["weights"]) == 10
    for r in steps:
        progress = min(r["step"] / 2, 1.0)  # max_steps 2 is the epoch
        assert r["weights"] == pytest.approx(list(alpha_at(process, progress).values()), abs=1e-12)


def test_the_reference_weight_scale_is_the_official_retrains():
    """reference: w_p = P exp(a_p) / (sum_q exp(a_q) + e) per step (logits all 1, the official initial alpha, with
    P = 3: 3 e / (3 e + e) = 0.75 each); the same ratios as softmax, so the same normalised alpha."""
    from pipeline.process.artefact import normalised, weight_rows

    process = _process([[1.0, 1.0, 1.0], [0.0, -1.0, 2.0], [400.0, 0.0, -3.0]])
    rows = weight_rows(process, "reference")
    assert rows[0].tolist() == pytest.approx([0.75] * 3, abs=1e-15)
    z = np.exp(np.array([0.0, -1.0, 2.0]))
    assert rows[1].tolist() == pytest.approx((3 * z / (z.sum() + np.e)).tolist(), abs=1e-15)
    assert rows[2].tolist() == pytest.approx([3.0, 0.0, 0.0], abs=1e-12)  # large logits: no overflow
    ratio = rows / rows.max(axis=1, keepdims=True)
    assert np.allclose(ratio, normalised(process)) and np.array_equal(weight_rows(process), process.weights)
    with pytest.raises(ProcessError, match="weight scale 'sum'"):
        weight_rows(process, "sum")


def test_train_student_with_reference_weights_follows_the_official_scale(staged, searched, tmp_path):
    from pipeline.process.artefact import weight_rows

    process = load_process(searched)
    _train(staged, tmp_path / "run", searched, epochs=1, max_steps=2, process_weights="reference")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = weight_rows(process, "reference")
    for r in (r for r in records if r["kind"] == "step"):
        progress = min(r["step"] / 2, 1.0)
        want = [np.interp(progress, process.progress, rows[:, p]) for p in range(rows.shape[1])]
        assert r["weights"] == pytest.approx(want, abs=1e-12) and sum(r["weights"]) > 5  # ~P, not 1
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert prov["process"]["weights"] == "reference"
    with pytest.raises(ConfigError, match="key 'process_weights'"):
        from stages.train_student import TrainStudentConfig

        TrainStudentConfig(cache="c", out="o", projection=("p",), process_weights="reference")


def test_a_process_transfers_to_another_student_with_the_same_stages_and_is_recorded(
    staged, searched, tmp_path
):
    import json

    _train(staged, tmp_path / "mnv2", searched, student=("mobilenet_v2",), epochs=1, max_steps=1)
    prov = json.loads((tmp_path / "mnv2" / "provenance.json").read_text())
    assert prov["process"]["transferred"] is True and prov["process"]["searched_for"]["student"] == "resnet18"


def test_train_student_refuses_a_process_that_does_not_fit_or_is_misused(
    staged, searched, tmp_path, demo_shards
):
    from pipeline.manifest import ConfigError
    from stages.train_student import TrainStudentConfig

    other = tmp_path / "pre"
    cache_run(CacheTeacherConfig(shards=str(demo_shards["train"]), out=str(other), teacher="resnet18",
                                 weights=str(staged["dir"] / "teacher.pt"), taps=("pre_relu",), views=1,
                                 resolution=32, workers=0, device="cpu", dtype="float32", quiet=True))  # fmt: skip
    with pytest.raises(Exception, match="searched for 4 teacher and 4 student stages; this pair has 0"):
        _train({"cache": other}, tmp_path / "x", searched)
    base = dict(cache="c", out="o")
    with pytest.raises(ConfigError, match="pass --process"):
        TrainStudentConfig(**base, loss="distpro")
    with pytest.raises(ConfigError, match="with --loss distpro"):
        TrainStudentConfig(**base, process=str(searched), projection=("p.npz",))
    with pytest.raises(ConfigError, match="leave targets"):
        TrainStudentConfig(**base, loss="distpro", process=str(searched), targets=("stage1=stage1",))
    with pytest.raises(ConfigError, match="alpha_threshold"):
        TrainStudentConfig(**base, loss="distpro", process=str(searched), alpha_threshold=1.5)
