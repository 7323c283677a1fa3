"""Cosine top-``pool`` of every row among all rows, block by block on one device per rank, each rank mining the
queries of its share, every rank ending with the whole table (CoSS's neighbour table; the rows come from the cache
in :func:`pipeline.student.neighbours.neighbour_table`).

N rows, D their width, W ranks, rank r holding the contiguous share ``[N r / W, N (r + 1) / W)`` (``n_r`` rows)::

    table = mine_shared(share, n, pool=31, device=torch.device("cuda:0"))  # (N, 31) int32 on every rank

- Mining: the shares are broadcast in key blocks of ``k_block`` rows (each rank in turn); every rank scores its own
  queries against each block in tiles of ``q_block`` x ``k_block`` and keeps a running top-``pool`` per query.
  Device memory per rank: its share (n_r x D in the cache's dtype) + one key block (k_block x D: as read, float32
  and low-precision) + one tile (q_block x k_block) + the running table (n_r x pool, float32 + int64): O(block^2)
  beside the share, never N x N or q_block x N.
- Precision: tiles are scored in ``dtype`` (float16 on CUDA: tensor cores; float32 on the CPU, whose half matmuls
  are slower). Each tile's top ``pool + margin`` candidates are re-scored in float64 from the float32-normalised
  rows (as ``torch.nn.functional.normalize`` gives them) and rounded to float32: the table is ordered by these
  correctly rounded float32 cosines, ties to the lower row. A tile score is within :func:`score_error` of the
  float64 one, so a query whose ``pool``-th candidate scores above every left-out candidate's tile score + that
  bound has its exact top-``pool``; any other query is mined again in float64 against every row
  (:func:`_exact_pass`). The table therefore does not depend on ``dtype``, the tiling, the number of ranks or the
  device. (A float32 matmul's own scores are off by a few units in the last place, depending on its kernel: two
  candidates that close may come in another order there.)
- The ranks' parts are all-gathered: every rank holds the same (N, pool) int32 table.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import KdepError
from pipeline.progress import progress_bar

MARGIN = 32  # extra low-precision candidates per tile and query (re-scored in float32)
EMPTY = -1  # index of a table slot not filled yet (its score is -inf)


class NeighbourError(KdepError):
    """Neighbour mining is not possible with this cache."""


@dataclass(frozen=True)
class Blocks:
    """Tile sizes: queries x keys per similarity tile (``q_block`` x ``k_block`` scores in memory at once)."""

    q_block: int = 4096
    k_block: int = 32768

    @staticmethod
    def for_device(device: torch.device) -> Blocks:
        """256 MiB float16 tiles on CUDA; 32 MiB float32 tiles on the CPU."""
        return Blocks() if device.type == "cuda" else Blocks(1024, 8192)


def share_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)``: the contiguous share of ``n`` images that ``rank`` of ``world`` reads and mines."""
    return n * rank // world, n * (rank + 1) // world


def world_of() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_pool(pool: int, n: int) -> None:
    if pool >= n:
        raise NeighbourError(f"neighbour pool {pool} needs more than {n} images")


def mine_shared(
    share: np.ndarray,
    n: int,
    pool: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    blocks: Blocks | None = None,
    margin: int = MARGIN,
    quiet: bool = True,
    stats: dict | None = None,
    ranks: tuple[int, int] | None = None,
) -> np.ndarray:
    """This rank's share ``(n_r, D)`` of the ``n`` images' features (rows ``share_bounds(n, rank, world)``) ->
    the whole table ``(n, pool)`` int32, on every rank. ``dtype``: the tile scores' (default float16 on CUDA,
    float32 elsewhere). ``stats`` (optional) receives ``{"rechecked": queries mined again exactly, all ranks}``.
    ``ranks``: (rank, world), default the process group's; (0, 1) mines in this process alone."""
    device = torch.device(device)
    rank, world = ranks or world_of()
    check_pool(pool, n)
    lo, hi = share_bounds(n, rank, world)
    if share.shape[0] != hi - lo:
        raise ValueError(f"rank {rank} holds {share.shape[0]} rows; its share of {n} is {hi - lo}")
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    miner = _Miner(torch.from_numpy(np.ascontiguousarray(share)).to(device), lo, n, pool, dtype,
                   blocks or Blocks.for_device(device), margin, rank, world)  # fmt: skip
    with exact_matmuls():
        miner.run(quiet)
        rechecked = miner.recheck()
    if stats is not None:
        stats["rechecked"] = rechecked
    return gather_table(miner.idx.to(torch.int32), n, world)


@contextlib.contextmanager
def exact_matmuls() -> Iterator[None]:
    """float32 matmuls without TF32 and half matmuls that accumulate in float32 inside the block (restored after):
    the error bound of :func:`score_error` assumes both."""
    m = torch.backends.cuda.matmul
    saved = m.allow_tf32, m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction
    m.allow_tf32 = m.allow_fp16_reduced_precision_reduction = m.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_tf32, m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = (
            saved
        )


def score_error(dtype: torch.dtype, dim: int) -> float:
    """An upper bound on |tile score in ``dtype`` - re-scored float64 score| for two float32 unit vectors of ``dim``
    components.

    Rounding each component to ``dtype`` (unit roundoff u; none for float32) moves the dot product by at most
    (2u + u^2) sum |x_i y_i| <= 2u + u^2; components in ``dtype``'s subnormal range move by at most half its
    smallest step s, at most s sqrt(dim) in all; rounding the result to ``dtype`` adds u (|score| <= 1); summing
    ``dim`` products in float32 costs gamma(u32) = dim u32 / (1 - dim u32), and the float64 score gamma(u64)."""
    u32, u64 = torch.finfo(torch.float32).eps / 2, torch.finfo(torch.float64).eps / 2
    sums = sum(dim * v / (1 - dim * v) for v in (u32, u64))
    if dtype == torch.float32:
        return sums
    info = torch.finfo(dtype)
    u = info.eps / 2
    step = info.smallest_normal * info.eps  # the subnormal spacing
    return 3 * u + u * u + step * math.sqrt(dim) + sums


class _Miner:
    """The running top-``pool`` (``score`` float32, ``idx`` int64, most similar first) of this rank's queries."""

    def __init__(self, share: torch.Tensor, lo: int, n: int, pool: int, dtype: torch.dtype, blocks: Blocks,
                 margin: int, rank: int, world: int) -> None:  # fmt: skip
        self.share, self.lo, self.n, self.pool, self.dtype = share, lo, n, pool, dtype
        self.blocks, self.margin, self.rank, self.world = blocks, margin, rank, world
        self.norms = torch.cat([_norms(share[i : i + blocks.q_block]) for i in range(0, len(share), blocks.q_block)]
                               or [torch.zeros(0, device=share.device)])  # fmt: skip
        rows, device = len(share), share.device
        self.score = torch.full((rows, pool), -math.inf, device=device)
        self.idx = torch.full((rows, pool), EMPTY, dtype=torch.int64, device=device)
        self.bound = torch.full((rows,), -math.inf, device=device)  # no left-out candidate scores above it
        self.eps = score_error(dtype, share.shape[1])
        self.scratch = Scratch()  # the tile and the gathered candidates, reused (fresh CPU memory is slow)

    def key_blocks(self) -> list[tuple[int, int, int]]:
        """(owner rank, first, end) of every key block: the same list on every rank."""
        out = []
        for owner in range(self.world):
            a, b = share_bounds(self.n, owner, self.world)
            out += [(owner, k, min(k + self.blocks.k_block, b)) for k in range(a, b, self.blocks.k_block)]
        return out

    def keys(self, owner: int, first: int, end: int) -> torch.Tensor:
        """(end - first, D) float32 unit rows of key block [first, end), broadcast by its owner."""
        raw, norms = _broadcast_block(self, owner, first, end)
        return raw.float() / norms[:, None]

    def run(self, quiet: bool) -> None:
        blocks = self.key_blocks()
        for owner, first, end in progress_bar(blocks, desc="mine neighbours", unit="block", disable=quiet,
                                              leave=False):  # fmt: skip
            keys = self.keys(owner, first, end)
            low, exact = keys.to(self.dtype), keys.double()  # the tiles' keys, the re-scored candidates'
            for q in range(0, len(self.share), self.blocks.q_block):
                self._tile(slice(q, min(q + self.blocks.q_block, len(self.share))), low, exact, first)

    def queries(self, sel: slice | torch.Tensor) -> torch.Tensor:
        return self.share[sel].float() / self.norms[sel][:, None]

    def _tile(self, sel: slice, low: torch.Tensor, keys64: torch.Tensor, first: int) -> None:
        q32 = self.queries(sel)
        scores = self.scratch.get("tile", (len(q32), len(low)), self.dtype, q32.device)
        torch.mm(q32.to(self.dtype), low.T, out=scores)  # float32 accumulation (exact_matmuls)
        _mask_self(scores, self.lo + sel.start, first)
        keep = min(self.pool + self.margin, scores.shape[1])
        top, cols = scores.topk(keep, dim=1)
        if keep < scores.shape[1]:  # the rest score at most top[:, -1] in dtype
            self.bound[sel] = torch.maximum(self.bound[sel], (top[:, -1].double() + self.eps).float())
        # Only candidates that may reach the query's top-pool are re-scored (a prefix of each sorted row): not those
        # below its current pool-th, nor those below this tile's own pool-th by twice the bound (the tile's top
        # pool all score higher). Compared after rounding to float32, as the scores are: no left-out one can tie.
        floor = self.score[sel][:, -1:]
        if keep >= self.pool:
            floor = torch.maximum(floor, (top[:, self.pool - 1 : self.pool].double() - self.eps).float())
        may = ((top.double() + self.eps).float() >= floor) & ~torch.isinf(top)  # -inf: the query itself
        width = int(may.sum(dim=1).max())
        if width:
            exact = _rescore(q32.double(), keys64, cols[:, :width], may[:, :width], self.scratch)
            self.score[sel], self.idx[sel] = merge_top(
                self.score[sel], self.idx[sel], exact, cols[:, :width] + first, self.pool
            )

    def recheck(self) -> int:
        """Mine again, in float64 against every row, the queries whose candidates could have missed one; returns
        how many there were over all ranks."""
        fail = torch.nonzero(self.score[:, -1] <= self.bound).flatten()
        count = torch.tensor([len(fail)], device=self.share.device)
        if self.world > 1:
            dist.all_reduce(count)
        if int(count.item()):
            _exact_pass(self, fail)
        return int(count.item())


def _exact_pass(miner: _Miner, fail: torch.Tensor) -> None:
    """float64 scores of the queries ``fail`` (positions in the share) against every row, top-``pool`` kept."""
    m, pool = miner, miner.pool
    score = torch.full((len(fail), pool), -math.inf, device=fail.device)
    idx = torch.full((len(fail), pool), EMPTY, dtype=torch.int64, device=fail.device)
    for owner, first, end in m.key_blocks():
        keys = m.keys(owner, first, end).double()
        for q in range(0, len(fail), m.blocks.q_block):
            sel = slice(q, q + m.blocks.q_block)
            scores = (m.queries(fail[sel]).double() @ keys.T).float()  # correctly rounded
            hit = fail[sel] + m.lo - first  # the query itself, where it is in this block
            inside = (hit >= 0) & (hit < len(keys))
            scores[torch.nonzero(inside).flatten(), hit[inside]] = -math.inf
            top, cols = top_with_ties(scores, min(pool, scores.shape[1]))
            score[sel], idx[sel] = merge_top(score[sel], idx[sel], top, cols + first, pool)
    m.score[fail], m.idx[fail] = score, idx


def _norms(x: torch.Tensor) -> torch.Tensor:
    """(n, D) -> (n,) float32 L2 norms, floored at 1e-12 (``torch.nn.functional.normalize``'s floor)."""
    return torch.linalg.vector_norm(x.float(), dim=1).clamp_min(1e-12)


def _mask_self(scores: torch.Tensor, q_first: int, k_first: int) -> None:
    """-inf where the query's row is the key's row (a tile of queries from ``q_first`` and keys from ``k_first``)."""
    a, b = max(q_first, k_first), min(q_first + scores.shape[0], k_first + scores.shape[1])
    if a < b:
        same = torch.arange(a, b, device=scores.device)
        scores[same - q_first, same - k_first] = -math.inf


def _rescore(
    q64: torch.Tensor, keys64: torch.Tensor, cols: torch.Tensor, wanted: torch.Tensor, scratch: Scratch,
    chunk: int = 128,
) -> torch.Tensor:  # fmt: skip
    """Scores of queries (q, D) with their candidate keys ``keys64[cols]`` (q, c) where ``wanted`` (q, c, a prefix
    of each row), both the float32 unit rows held in float64 (their products exact): summed in float64 and rounded
    to float32, -inf elsewhere. ``chunk`` queries at a time, each gathering as many key rows as its widest query
    needs (the gather is the cost: c x D x 8 bytes per query)."""
    out = torch.full(cols.shape, -math.inf, device=q64.device)
    need = wanted.sum(dim=1)
    for a in range(0, len(cols), chunk):
        b, width = min(len(cols), a + chunk), int(need[a : a + chunk].max())
        if width:
            gathered = scratch.get("gather", ((b - a) * width, keys64.shape[1]), keys64.dtype, keys64.device)
            torch.index_select(keys64, 0, cols[a:b, :width].reshape(-1), out=gathered)
            out[a:b, :width] = (
                torch.bmm(gathered.view(b - a, width, -1), q64[a:b, :, None]).squeeze(2).float()
            )
    return out.masked_fill(~wanted, -math.inf)


class Scratch:
    """Named flat buffers handed out as contiguous views, grown when too small, never shrunk."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        size = math.prod(shape)
        have = self.buffers.get(name)
        if have is None or have.numel() < size or have.dtype != dtype or have.device != device:
            have = self.buffers[name] = torch.empty(size, dtype=dtype, device=device)
        return have[:size].view(shape)


def top_with_ties(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row of ``score`` (q, m), ties to the lower column: (scores, columns)."""
    pick = torch.argsort(score, dim=1, descending=True, stable=True)[:, :k]
    return score.gather(1, pick), pick


def merge_top(
    score_a: torch.Tensor, idx_a: torch.Tensor, score_b: torch.Tensor, idx_b: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` of two candidate sets of disjoint rows, by score descending, then row ascending (an empty
    slot, row -1 at -inf, after every row)."""
    score, idx = torch.cat([score_a, score_b], 1), torch.cat([idx_a, idx_b], 1)
    by_row = torch.argsort(torch.where(idx < 0, torch.iinfo(idx.dtype).max, idx), dim=1, stable=True)
    score, idx = score.gather(1, by_row), idx.gather(1, by_row)
    pick = torch.argsort(score, dim=1, descending=True, stable=True)[:, :k]
    return score.gather(1, pick), idx.gather(1, pick)


def _broadcast_block(m: _Miner, owner: int, first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [first, end) of ``owner``'s share (raw features and norms), on every rank."""
    share, lo = m.share, m.lo
    if m.rank == owner:
        raw, nrm = share[first - lo : end - lo].contiguous(), m.norms[first - lo : end - lo].contiguous()
    else:
        raw = torch.empty((end - first, share.shape[1]), dtype=share.dtype, device=share.device)
        nrm = torch.empty(end - first, device=share.device)
    if m.world > 1:
        dist.broadcast(raw, src=owner)
        dist.broadcast(nrm, src=owner)
    return raw, nrm


def gather_table(part: torch.Tensor, n: int, world: int) -> np.ndarray:
    """This rank's rows of the table -> the whole (n, pool) table on every rank (all-gather, padded to the largest
    share)."""
    if world == 1:
        return part.cpu().numpy()
    size = -(-n // world)
    padded = torch.full((size, part.shape[1]), EMPTY, dtype=part.dtype, device=part.device)
    padded[: len(part)] = part
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: b - a] for p, (a, b) in zip(parts, [share_bounds(n, r, world) for r in range(world)],
                                                          strict=True)]).cpu().numpy()  # fmt: skip
