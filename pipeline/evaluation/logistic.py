"""The linear probe's solvers: multinomial logistic regression on standardised features, in torch or scikit-learn.

    solver = make_solver("torch", x_train, y_train, torch.device("cuda"), max_iter=1000)
    converged = solver.fit(rows, c=0.1)        # rows: sorted train row indices, or None for all of them
    predicted = solver.predict(x_val)          # (M,) labels

Both solve the problem of scikit-learn's ``StandardScaler`` + ``LogisticRegression(C=c)`` (lbfgs, multinomial):

    minimise over W (D, K), b (K):   sum_i CE(softmax(W^T z_i + b), y_i) + ||W||_F^2 / (2 C)

with ``z_i = (x_i - mean) / scale`` standardised by the fitted rows' mean and population standard deviation (a
constant column gets scale 1, scikit-learn's rule), ``b`` unpenalised and K the classes present in the fitted rows.
For K = 2 scikit-learn fits one binary vector w = W_1 - W_0 with penalty ||w||^2 / (2 C), which is ||W||_F^2 / C
in the softmax's terms (its optimum has W_1 = -W_0 = w / 2): the torch solver doubles its penalty then, so that C
means the same for every K. Both minimise the mean form, mean_i CE + ||W||_F^2 / (2 C N) (same minimiser).

- ``torch`` (default): full-batch L-BFGS (``torch.optim.LBFGS``, strong-Wolfe line search) on ``device``. The
  features go to the device once, as stored (float16 halves it); the loss and its gradient are written out (no
  autograd graph over the data) and summed over blocks of rows, so memory beyond the features is O(block x
  (D + K)). Warm-started: a fit starts from the last solution for the same C if there is one, else from the last
  solution (the C sweep goes from strong to weak regularisation; the final fit on all rows starts from the chosen
  C's sweep solution). It stops when the largest gradient entry is below ``TOLERANCE_GRAD`` (scikit-learn's default
  is 1e-4 on the same mean-form objective), when the loss or the step stops changing, or after ``max_iter``
  iterations (then ``converged`` is False).
- ``sklearn``: the reference. Each fit starts from zero, on the CPU, with the fitted rows copied to float32 RAM.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

TOLERANCE_GRAD = 1e-5  # stop when max |gradient| of the mean-form objective is below this
TOLERANCE_CHANGE = 1e-10  # ... or when the loss or the parameters change by less than this in one iteration
HISTORY = 20  # L-BFGS correction pairs kept (2 x HISTORY x (D + 1) x K floats on the device)
BLOCK_ELEMENTS = 1 << 24  # a block of rows holds about this many floats of its widest (rows, D or K) array


def as_tensor(x: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``x``'s memory (a read-only array or memmap is never written through it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(x))


@dataclass
class LinearModel:
    """Standardise, then a linear map: ``logits = ((x - mean) / scale) @ weight + bias`` over ``classes``."""

    mean: torch.Tensor  # (D,) float32
    scale: torch.Tensor  # (D,) float32, > 0
    weight: torch.Tensor  # (D, K) float32
    bias: torch.Tensor  # (K,) float32
    classes: np.ndarray  # (K,) the labels of the K columns, ascending


class TorchLogistic:
    """The torch solver over train features ``x`` (N, D) float16/float32 and labels ``y`` (N,), kept on ``device``."""

    def __init__(
        self, x: np.ndarray, y: np.ndarray, device: torch.device, max_iter: int, warm_start: bool = True
    ) -> None:
        self.x = as_tensor(x).to(device)
        self.labels = np.asarray(y)
        self.y = torch.as_tensor(self.labels, dtype=torch.long, device=device)
        self.device, self.max_iter, self.warm_start = device, max_iter, warm_start
        self.block = max(1, BLOCK_ELEMENTS // max(x.shape[1], len(np.unique(self.labels))))
        self.model: LinearModel | None = None
        self.solutions: dict[float, LinearModel] = {}
        self.iterations: list[int] = []  # L-BFGS iterations of each fit so far

    def _rows(self, rows: np.ndarray | None) -> list[torch.Tensor | slice]:
        """Blocks of row indices (or slices of all rows, which need no gather)."""
        if rows is None:
            return [slice(s, s + self.block) for s in range(0, len(self.x), self.block)]
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        return list(index.split(self.block))

    def fit(self, rows: np.ndarray | None, c: float) -> bool:
        """Fit on the ``rows`` of x (None: all), warm-started; returns whether L-BFGS converged."""
        blocks = self._rows(rows)
        model = self._start(blocks, rows, c)
        codes = torch.searchsorted(torch.as_tensor(model.classes, device=self.device), self.y)
        n = len(self.x) if rows is None else len(rows)
        # lambda of the mean form; doubled for K = 2 (see the module docstring)
        penalty = (2.0 if len(model.classes) == 2 else 1.0) / (c * n)
        batches = self._batches(model, codes, blocks)
        converged, iterations = run_lbfgs(
            model, lambda: objective(model, batches(), n, penalty), self.max_iter
        )
        self.model = self.solutions[c] = model
        self.iterations.append(iterations)
        return converged

    def _start(self, blocks: list[torch.Tensor | slice], rows: np.ndarray | None, c: float) -> LinearModel:
        """The fit's standardisation (its rows' statistics) and starting point: the last solution for ``c``, else
        the last solution, else zeros (a solution over other classes does not fit)."""
        classes = np.unique(self.labels if rows is None else self.labels[rows])
        mean, scale = column_stats(lambda: (self.x[b] for b in blocks))
        start = self.solutions.get(c, self.model) if self.warm_start else None
        if start is not None and np.array_equal(start.classes, classes):
            return LinearModel(mean, scale, start.weight.clone(), start.bias.clone(), classes)
        weight = torch.zeros(self.x.shape[1], len(classes), device=self.device)
        return LinearModel(mean, scale, weight, torch.zeros(len(classes), device=self.device), classes)

    def _batches(
        self, model: LinearModel, codes: torch.Tensor, blocks: list[torch.Tensor | slice]
    ) -> Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]:
        """The fit's (standardised rows (b, D) float32, class codes (b,)) blocks, made anew for every evaluation;
        a fit of one block standardises it once (memory stays one block)."""
        if len(blocks) == 1:
            once = [(standardised(model, self.x[blocks[0]]), codes[blocks[0]])]
            return lambda: once
        return lambda: ((standardised(model, self.x[b]), codes[b]) for b in blocks)

    def predict_rows(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows),) predicted labels of train rows (e.g. the held-out part)."""
        return predict(self.model, (self.x[b] for b in self._rows(rows)))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(M,) predicted labels of new features (M, D)."""
        t = as_tensor(x)
        blocks = (t[s : s + self.block].to(self.device) for s in range(0, len(t), self.block))
        return predict(self.model, blocks)


def column_stats(blocks: Callable[[], Iterator[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, scale) (D,) float32 of the rows that ``blocks()`` yields: two passes summed in float64 (mean, then
    squared deviations); scale is the population standard deviation, 1 where scikit-learn's ``StandardScaler``
    deems a column constant."""
    n = sum(len(b) for b in blocks())
    mean = sum(b.float().sum(0, dtype=torch.float64) for b in blocks()) / n
    var = sum((b.float() - mean.float()).square_().sum(0, dtype=torch.float64) for b in blocks()) / n
    eps = torch.finfo(torch.float64).eps
    # scikit-learn's rule (sklearn.preprocessing._data._is_constant_feature)
    constant = var <= n * eps * var + (n * mean * eps).square()
    scale = torch.where(constant, torch.ones_like(var), var.sqrt())
    return mean.float(), scale.float()


def standardised(model: LinearModel, x: torch.Tensor) -> torch.Tensor:
    """(b, D) rows -> ``(x - mean) / scale`` in float32: one new tensor, updated in place (a third of the memory
    traffic of three out-of-place ops; subtracting before scaling keeps float32's precision for offset columns)."""
    return x.to(torch.float32, copy=True).sub_(model.mean).mul_(model.scale.reciprocal())


@torch.no_grad()
def objective(
    model: LinearModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n: int, penalty: float
) -> torch.Tensor:
    """Mean-form loss ``mean CE + penalty / 2 ||W||^2`` over the ``n`` rows of ``batches`` ((b, D) standardised
    rows, (b,) class codes) as a float64 scalar; sets ``model.weight.grad`` and ``model.bias.grad`` (the gradient
    ``Z^T (P - Y) / n + penalty W`` and ``sum(P - Y) / n``)."""
    w, b = model.weight, model.bias
    grad_w, grad_b = torch.zeros_like(w), torch.zeros_like(b)
    total = torch.zeros((), dtype=torch.float64, device=w.device)
    for z, y in batches:
        logits = torch.addmm(b, z, w)
        lse = logits.logsumexp(1)
        total += (lse - logits.gather(1, y[:, None])[:, 0]).sum(dtype=torch.float64)
        p = (logits - lse[:, None]).exp_()  # softmax
        p[torch.arange(len(y), device=y.device), y] -= 1.0  # P - Y
        grad_w.addmm_(z.T, p)
        grad_b += p.sum(0)
    w.grad = grad_w / n + penalty * w
    b.grad = grad_b / n
    return total / n + 0.5 * penalty * w.double().square().sum()


def run_lbfgs(model: LinearModel, loss: Callable[[], torch.Tensor], max_iter: int) -> tuple[bool, int]:
    """Minimise ``loss()`` (which sets the gradients) over ``model.weight`` and ``model.bias`` in place; returns
    (converged: False when it stopped at ``max_iter`` iterations or at the evaluation budget of 2 per iteration,
    iterations)."""
    params = [model.weight, model.bias]
    optimiser = torch.optim.LBFGS(
        params, lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=TOLERANCE_GRAD,
        tolerance_change=TOLERANCE_CHANGE, history_size=HISTORY, line_search_fn="strong_wolfe",
    )  # fmt: skip
    optimiser.step(loss)
    state = optimiser.state[params[0]]
    iterations = state.get("n_iter", 0)
    return iterations < max_iter and state.get("func_evals", 0) < 2 * max_iter, iterations


@torch.no_grad()
def predict(model: LinearModel, blocks: Iterable[torch.Tensor]) -> np.ndarray:
    """Predicted labels (argmax of the logits; the first class among ties, as scikit-learn) of row blocks."""
    codes = [torch.addmm(model.bias, standardised(model, x), model.weight).argmax(1).cpu() for x in blocks]
    return model.classes[torch.cat(codes).numpy()] if codes else model.classes[:0]


class SklearnLogistic:
    """The reference solver: scikit-learn's StandardScaler + LogisticRegression(lbfgs) on the CPU, from zero."""

    def __init__(self, x: np.ndarray, y: np.ndarray, max_iter: int) -> None:
        self.x, self.y, self.max_iter = x, np.asarray(y), max_iter
        self.pipeline = None
        self.iterations: list[int] = []  # lbfgs iterations of each fit so far

    def _features(self, rows: np.ndarray | None, x: np.ndarray | None = None) -> np.ndarray:
        x = self.x if x is None else x
        return np.asarray(x if rows is None else x[rows], dtype=np.float32)

    def fit(self, rows: np.ndarray | None, c: float) -> bool:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=self.max_iter))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            self.pipeline.fit(self._features(rows), self.y if rows is None else self.y[rows])
        self.iterations.append(int(self.pipeline[-1].n_iter_.max()))
        return not any(issubclass(w.category, ConvergenceWarning) for w in caught)

    def predict_rows(self, rows: np.ndarray) -> np.ndarray:
        return self.pipeline.predict(self._features(rows))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.pipeline.predict(self._features(None, x))


def make_solver(
    backend: str, x: np.ndarray, y: np.ndarray, device: torch.device, max_iter: int, warm_start: bool = True
) -> TorchLogistic | SklearnLogistic:
    """The ``torch`` (on ``device``; ``warm_start`` False: every fit from zero) or ``sklearn`` (CPU, every fit from
    zero) solver over train features ``x`` (N, D) and labels ``y`` (N,)."""
    if backend == "sklearn":
        return SklearnLogistic(x, y, max_iter)
    return TorchLogistic(x, y, device, max_iter, warm_start)
