"""The alpha gradient of DistPro's bi-level search: DARTS' unrolled step, exactly or by finite differences.

    grad, val_loss = hypergradient(model, train, val, xi, momentum, wd, buffers, nesterov=True, method="exact")

**The virtual step** is the SGD step the network would take at the current alpha (torch.optim.SGD, dampening 0)::

    d   = grad_w L_train(w, alpha) + wd * w
    b   = m * buf + d                    (buf: the momentum buffer; absent before the first step: b = d)
    w'  = w - xi * (d + m * b)           with Nesterov momentum
    w'  = w - xi * b                     with plain (heavy-ball) momentum

with xi the network's current lr. Only d depends on alpha, so dw'/dalpha = -c * d^2 L_train / (dw dalpha) with
c = xi * (1 + m) (Nesterov) or xi (heavy ball). The official code steps Nesterov SGD but unrolls the heavy-ball
formula (it leaves out the 1 + m and the extra m * b); here the virtual step is the optimiser's own.

**The alpha gradient** g = d L_val(w'(alpha), alpha) / d alpha (L_val is the held-out objective; DistPro's does not
depend on alpha directly, so all of g comes through w'):

- ``exact``: autograd through the virtual step (the train gradient built with ``create_graph``, then one backward
  of L_val(w') to alpha: a double backward). About one more backward than the finite difference; the graph of the
  train step is held until then.
- ``finite-difference`` (DARTS, the official code): v = grad_w' L_val(w'), eps = r / ||v||, w+- = w +- eps v,
  g = grad_alpha L_val(w', alpha) - c * (grad_alpha L_train(w+) - grad_alpha L_train(w-)) / (2 eps). Its error
  grows with r: at DARTS' r = 0.01 it was 6-44% off the exact gradient on small models (tests/test_process.py).

``order="first"`` is DARTS' first-order step (xi = 0: g = grad_alpha L_val(w, alpha)); with DistPro's objective it
is identically zero. Every loss is evaluated with :func:`torch.func.functional_call` on copies of the buffers, so
batch-norm running statistics are untouched by these extra forwards.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from pipeline.process.artefact import ProcessError

HYPERGRADIENTS = ("exact", "finite-difference")
ORDERS = ("second", "first")  # DARTS unrolled step, or its first-order simplification

Params = dict[str, torch.Tensor]


def weights_of(model) -> Params:
    """The model's trainable weights (everything but alpha), detached."""
    return {n: p.detach() for n, p in model.named_parameters() if n != "alpha" and p.requires_grad}


def _call(model, params: Params, batch):
    """Losses at ``params`` (weights and alpha), on copies of the buffers (running stats stay untouched)."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return functional_call(model, {**params, **buffers}, (batch.x, batch.targets, batch.labels))


def train_loss(model, w: Params, alpha: torch.Tensor, batch) -> torch.Tensor:
    task, losses = _call(model, {**w, "alpha": alpha}, batch)
    return model.train_objective(task, losses, alpha)


def val_loss(model, w: Params, alpha: torch.Tensor, batch) -> torch.Tensor:
    return _call(model, {**w, "alpha": alpha}, batch)[0]


def _grad(loss: torch.Tensor, inputs: list[torch.Tensor], create_graph: bool = False) -> list[torch.Tensor]:
    """Gradients, zeros for inputs the loss does not depend on."""
    if not loss.requires_grad:
        return [torch.zeros_like(i) for i in inputs]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, create_graph=create_graph)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs, strict=True)]


def _leaves(params: Params) -> Params:
    return {n: p.detach().clone().requires_grad_() for n, p in params.items()}


def sgd_update(grad: torch.Tensor, w: torch.Tensor, buf: torch.Tensor | None, momentum: float, weight_decay: float,
               nesterov: bool) -> torch.Tensor:  # fmt: skip
    """The direction torch.optim.SGD (dampening 0) subtracts times the lr (module docstring)."""
    d = grad + weight_decay * w
    if not momentum:
        return d
    b = d if buf is None else momentum * buf + d
    return d + momentum * b if nesterov else b


def virtual_step(model, batch, xi: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 buffers: Params | None = None, nesterov: bool = False, alpha: torch.Tensor | None = None,
                 create_graph: bool = False) -> Params:  # fmt: skip
    """``w' = w - xi * sgd_update(...)`` at ``alpha`` (default: the model's). Detached, or with ``create_graph``
    a function of ``alpha`` (and of fresh leaf copies of w) that autograd can differentiate."""
    alpha = model.alpha.detach() if alpha is None else alpha
    w = _leaves(weights_of(model))
    grads = _grad(train_loss(model, w, alpha, batch), list(w.values()), create_graph)
    buffers = buffers or {}
    out = {}
    for (name, p), g in zip(w.items(), grads, strict=True):
        new = p - xi * sgd_update(g, p, buffers.get(name), momentum, weight_decay, nesterov)
        out[name] = new if create_graph else new.detach()
    return out


def hypergradient(model, train, val, xi: float, momentum: float = 0.0, weight_decay: float = 0.0,
                  buffers: Params | None = None, radius: float = 0.01, order: str = "second",
                  method: str = "exact", nesterov: bool = False) -> tuple[torch.Tensor, float]:  # fmt: skip
    """(d L_val / d alpha as in the module docstring, L_val at the weights it was measured at)."""
    alpha = model.alpha.detach().clone().requires_grad_()
    if order == "first":
        loss = val_loss(model, weights_of(model), alpha, val)
        return _grad(loss, [alpha])[0], float(loss.detach())
    if order != "second":
        raise ProcessError(f"order {order!r}; use one of {', '.join(ORDERS)}")
    if method == "exact":
        w_virtual = virtual_step(model, train, xi, momentum, weight_decay, buffers, nesterov, alpha, True)
        loss = val_loss(model, w_virtual, alpha, val)
        return _grad(loss, [alpha])[0].detach(), float(loss.detach())
    if method != "finite-difference":
        raise ProcessError(f"hypergradient {method!r}; use one of {', '.join(HYPERGRADIENTS)}")
    return _finite_difference(model, train, val, xi, momentum, weight_decay, buffers, radius, nesterov, alpha)


def _finite_difference(model, train, val, xi: float, momentum: float, weight_decay: float, buffers: Params | None,
                       radius: float, nesterov: bool, alpha: torch.Tensor) -> tuple[torch.Tensor, float]:  # fmt: skip
    w_virtual = _leaves(virtual_step(model, train, xi, momentum, weight_decay, buffers, nesterov))
    loss = val_loss(model, w_virtual, alpha, val)
    direct, *v = _grad(loss, [alpha, *w_virtual.values()])
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in v))
    if norm == 0:  # the held-out loss does not move with w: no implicit term
        return direct, float(loss.detach())
    eps = radius / norm.to(v[0].dtype)
    w = weights_of(model)
    plus = {n: p + eps * g for (n, p), g in zip(w.items(), v, strict=True)}
    minus = {n: p - eps * g for (n, p), g in zip(w.items(), v, strict=True)}
    g_plus = _grad(train_loss(model, plus, alpha, train), [alpha])[0]
    g_minus = _grad(train_loss(model, minus, alpha, train), [alpha])[0]
    c = xi * (1.0 + momentum) if nesterov and momentum else xi
    return direct - c * (g_plus - g_minus) / (2 * eps), float(loss.detach())


def momentum_buffers(model, optimizer: torch.optim.Optimizer) -> Params:
    """The SGD momentum buffer of each weight (absent before the first step)."""
    return {
        n: optimizer.state.get(p, {}).get("momentum_buffer")
        for n, p in model.named_parameters()
        if n != "alpha"
    }
