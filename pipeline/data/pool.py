"""Independent tasks on a process pool (or in this process), with results as they finish and one-line errors.

Tasks and the task function must be picklable (a top-level function and small specs): the pool uses the 'spawn'
start method, so a worker imports what it needs and inherits nothing (no threads, no open files, no arrays); a
script that starts a pool needs the ``if __name__ == "__main__":`` guard (the ``kdep`` command has it).
Tasks are submitted a few at a time, so a long task list is never pickled up front and an error stops the run
after the tasks already running. A task's user error (KdepError) reaches the caller as it is; any other
exception, or a worker process that dies, becomes a one-line :class:`TaskError` naming the task.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from pipeline.errors import KdepError

T = TypeVar("T")
R = TypeVar("R")
AUTO = -1  # a ``workers`` value: the cores this process may use


class TaskError(KdepError):
    """A task failed with an unexpected error, or its worker process died; the message names the task."""


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a cluster job's allocation), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def resolve_workers(workers: int, tasks: int) -> int:
    """Processes to start for ``tasks`` tasks: ``AUTO`` -> the available cores, never more than the tasks;
    0 or 1 -> 0 (run in this process)."""
    n = available_cores() if workers == AUTO else workers
    n = min(n, tasks)
    return n if n > 1 else 0


def run_tasks(
    fn: Callable[[T], R],
    tasks: Iterable[T],
    workers: int,
    on_result: Callable[[int, R], None],
    name: Callable[[T], str],
) -> None:
    """Call ``fn(task)`` for every task and ``on_result(task number, result)`` in this process as each finishes.

    ``workers`` <= 1 runs the tasks here, in order; more starts that many processes (results then arrive in
    completion order). ``name(task)`` names a task in error messages (e.g. the output file it writes)."""
    if workers <= 1:
        for number, task in enumerate(tasks):
            on_result(number, _call_here(fn, task, name))
        return
    _run_pool(fn, tasks, workers, on_result, name)


def _call_here(fn: Callable[[T], R], task: T, name: Callable[[T], str]) -> R:
    try:
        return fn(task)
    except KdepError:
        raise
    except Exception as err:
        raise TaskError(f"{name(task)}: {type(err).__name__}: {err}") from err


def _run_pool(fn, tasks, workers, on_result, name) -> None:
    todo = enumerate(tasks)
    running: dict[Future, tuple[int, Any]] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        try:
            _submit(pool, fn, todo, running, 2 * workers)  # one queued behind each running task
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: running[f][0]):
                    number, task = running.pop(future)
                    on_result(number, _result(future, task, name))
                _submit(pool, fn, todo, running, 2 * workers)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the running tasks end; queued ones never start
            raise


def _submit(pool: ProcessPoolExecutor, fn, todo, running: dict, limit: int) -> None:
    while len(running) < limit:
        item = next(todo, None)
        if item is None:
            return
        running[pool.submit(fn, item[1])] = item


def _result(future: Future, task: Any, name: Callable[[Any], str]) -> Any:
    try:
        return future.result()
    except KdepError:
        raise
    except BrokenProcessPool:
        raise TaskError(
            f"{name(task)}: a worker process died while running it or another task (killed, out of memory, or "
            "started from a script without an `if __name__ == '__main__':` guard)"
        ) from None
    except Exception as err:
        raise TaskError(f"{name(task)}: {type(err).__name__}: {err}") from err
