"""The process pool of `make-shards` against running the same tasks in this process: every result delivered
once with its task number, user errors passed through, other errors and a dead worker one-line TaskErrors."""

from __future__ import annotations

import os
import time

import pytest

from pipeline.data.pool import AUTO, TaskError, available_cores, resolve_workers, run_tasks
from pipeline.errors import KdepError


def _square(x: int) -> int:
    time.sleep(0.01 * (x % 3))  # finish out of order
    return x * x


def _fail_at_zero(x: int) -> int:
    if x == 0:
        raise KeyError("boom")
    time.sleep(0.2)
    return x


def _user_error(x: int) -> int:  # every task fails: which one is reported first depends on timing
    raise KdepError(f"bad input {x}; fix it")


def _die(x: int) -> int:
    os._exit(3)  # a worker killed mid-task (e.g. by the OOM killer)


def _collect(fn, tasks, workers) -> dict[int, int]:
    got: dict[int, int] = {}

    def on_result(number: int, value: int) -> None:
        assert number not in got
        got[number] = value

    run_tasks(fn, tasks, workers, on_result, name=lambda t: f"task {t}")
    return got


@pytest.mark.parametrize("workers", [0, 2])
def test_every_result_arrives_once_with_its_number(workers):
    tasks = iter(range(10, 30))  # an iterator: submitted as the pool needs them
    assert _collect(_square, tasks, workers) == {i: (i + 10) ** 2 for i in range(20)}


@pytest.mark.parametrize("workers", [0, 2])
def test_unexpected_error_is_one_task_error_naming_the_task(workers):
    with pytest.raises(TaskError, match=r"^task 0: KeyError: 'boom'$"):
        _collect(_fail_at_zero, range(40), workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_user_error_passes_through_as_it_is(workers):
    with pytest.raises(KdepError, match=r"^bad input \d; fix it$") as info:
        _collect(_user_error, range(3), workers)
    assert type(info.value) is KdepError


def test_error_stops_the_run_without_running_every_task():
    got: list[int] = []
    with pytest.raises(TaskError):
        run_tasks(_fail_at_zero, range(40), 2, lambda n, v: got.append(n), name=str)
    assert len(got) < 8  # at most the tasks already submitted (2 per worker) ran


def test_a_dead_worker_is_a_task_error():
    with pytest.raises(TaskError, match=r"task \d: a worker process died"):
        _collect(_die, range(4), 2)


def test_resolve_workers():
    assert resolve_workers(AUTO, 1000) == (available_cores() if available_cores() > 1 else 0)
    assert resolve_workers(AUTO, 1) == 0 and resolve_workers(1, 50) == 0 and resolve_workers(0, 50) == 0
    assert resolve_workers(8, 3) == 3 and resolve_workers(8, 100) == 8
