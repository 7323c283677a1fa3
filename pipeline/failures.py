"""One rank's failure ends every rank within seconds, also while the others wait inside a collective.

Stage 3 steps through collectives (DDP's gradient all-reduce, Join's bookkeeping, barriers). A rank that raises
there leaves the others waiting in the next collective until the process-group timeout (``KDEP_DIST_TIMEOUT_S``,
an hour by default): NCCL never notices a dead peer, and no launcher tells ranks on other nodes. So a run is
guarded by :func:`shared_failures`:

- the rank that raises first publishes its one-line message (``rank R failed: ...``) in the job's key-value store
  (the one ``torch.distributed`` rendezvoused through) and waits up to a few seconds for the others to read it,
  then raises as usual (the CLI prints ``error: ...`` and exits 1);
- every rank watches that key from a daemon thread; another rank's message is printed as ``error: rank R failed:
  ...`` and the process exits with status 1 at once (its main thread may be blocked in a collective that can never
  finish, so it cannot raise there; DataLoader workers notice their parent is gone and exit);
- a rank that fails *because* another did (a :class:`~pipeline.runtime.RankError`, or a collective broken by the dead
  peer) raises the first failure's message, so every rank ends with the same line, after waiting as long as a
  watcher does (the failing rank prints its own line before a launcher that sees this rank exit stops the job).

Without a process group, or without a store to publish in, the context is a no-op.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import torch.distributed as dist

from pipeline.runtime import RankError, describe_failure

POLL_S = 0.5  # how often each rank looks for another rank's failure
ACK_WAIT_S = 5.0  # how long the failing rank waits for the others to have read its message
EXIT_DELAY_S = 1.0  # how long a rank that read another's failure waits before exiting (see _Watcher.run)
_guards = itertools.count()  # guarded runs in this process: the same sequence on every rank, so keys agree


def _job_store() -> dist.Store | None:
    """A thread-safe handle on the store the process group rendezvoused through, or None."""
    with contextlib.suppress(Exception):
        return dist.distributed_c10d._get_default_store().clone()
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        with contextlib.suppress(Exception):
            return dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=30))
    return None


def _failure_key(what: str) -> str:
    run = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID") or "job"
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"kdep/failure/{run}/{restart}/{what}/{next(_guards)}"


class _Watcher(threading.Thread):
    """Polls the failure key; another rank's message ends this process (exit status 1)."""

    def __init__(self, store: dist.Store, key: str, rank: int) -> None:
        super().__init__(name="kdep-failure-watch", daemon=True)
        self.store, self.key, self.rank = store, key, rank
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(POLL_S):
            try:
                if not self.store.check([self.key]):
                    continue
                message = self.store.get(self.key).decode()
                if message.startswith(f"rank {self.rank} failed"):
                    return  # our own: the main thread is raising it
                self.store.add(f"{self.key}/read", 1)
            except Exception:
                return  # the store is gone (its host ended the run): nothing left to watch
            if self.stopped.is_set():
                return
            sys.stdout.flush()
            sys.stderr.write(f"error: {message}\n")
            sys.stderr.flush()
            time.sleep(EXIT_DELAY_S)  # the failing rank prints its own line before a launcher stops the job
            os._exit(1)

    def stop(self) -> None:
        self.stopped.set()


def _publish(store: dist.Store, key: str, err: Exception, world: int) -> Exception:
    """Publish ``err``'s one-line message unless another rank was first; return what this rank should raise."""
    if isinstance(err, RankError):
        # raised because another rank failed (e.g. in a gather): nothing new to tell, but count as having read
        # it, so the failing rank need not wait for acknowledgements until the launcher stops it
        with contextlib.suppress(Exception):
            store.add(f"{key}/read", 1)
        return err
    message = describe_failure(err)
    try:
        first = store.compare_set(key, "", message).decode()
    except Exception:
        return err  # no store any more: raise our own
    if first != message:
        return RankError(first)  # another rank failed first; ours is most likely a consequence
    deadline = time.monotonic() + ACK_WAIT_S
    with contextlib.suppress(Exception):
        while store.add(f"{key}/read", 0) < world - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    return err


@contextlib.contextmanager
def shared_failures(what: str) -> Iterator[None]:
    """Guard a run of ``what`` (e.g. ``train-student``) on every rank; see the module docstring."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        yield
        return
    store = _job_store()
    if store is None:
        yield
        return
    key = _failure_key(what)
    watcher = _Watcher(store, key, dist.get_rank())
    watcher.start()
    try:
        yield
    except Exception as err:
        watcher.stop()
        raised = _publish(store, key, err, dist.get_world_size())
        if isinstance(raised, RankError):
            time.sleep(EXIT_DELAY_S)  # the failing rank prints its own line before a launcher stops the job
        if raised is err:
            raise
        raise raised from None
    finally:
        watcher.stop()
