"""pipeline.runtime against hand-worked expectations: the device each rank picks (torch.cuda monkeypatched, no GPU
needed), the backend, timeout and device_id given to init_process_group, AMP and TF32 resolution, and the
failure-sharing collectives, on one process and under torchrun with gloo (a failure on one rank is raised on every
rank instead of leaving the others waiting)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipeline import runtime
from pipeline.errors import KdepError
from pipeline.runtime import (
    dist_backend,
    dist_timeout,
    gather_from_ranks,
    init_distributed,
    on_every_rank,
    on_main_rank,
    pick_device,
    resolve_amp,
    set_tf32,
)


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``n`` visible CUDA devices (0: none)."""

    def have(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return have


def _ranks(monkeypatch, world: int, local_rank: int) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))


def test_cuda_device_is_local_rank_modulo_visible_gpus(gpus, monkeypatch):
    gpus(2)
    _ranks(monkeypatch, 4, 3)
    assert pick_device("cuda") == torch.device("cuda:1") == pick_device("auto")
    gpus(1)  # SLURM per-task isolation: every rank sees only its own GPU, as cuda:0
    assert pick_device("cuda") == torch.device("cuda:0")
    _ranks(monkeypatch, 1, 0)
    assert pick_device("cuda:1") == torch.device("cuda:1")  # one process may name its GPU


def test_explicit_gpu_index_is_refused_with_several_ranks(gpus, monkeypatch):
    gpus(8)
    _ranks(monkeypatch, 2, 1)
    with pytest.raises(KdepError, match=r"--device cuda:3 with 2 ranks .*use --device cuda or auto"):
        pick_device("cuda:3")


def test_no_cuda_auto_is_cpu_and_cuda_is_refused(gpus, monkeypatch):
    gpus(0)
    _ranks(monkeypatch, 2, 1)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(KdepError, match="CUDA is not available"):
        pick_device("cuda")


def test_backend_and_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv("KDEP_DIST_BACKEND", raising=False)
    monkeypatch.delenv("KDEP_DIST_TIMEOUT_S", raising=False)
    assert dist_backend("cuda:0") == "nccl" and dist_backend("cpu") == "gloo"
    assert dist_timeout() == timedelta(seconds=runtime.DEFAULT_TIMEOUT_S)
    monkeypatch.setenv("KDEP_DIST_BACKEND", "gloo")  # two ranks sharing one GPU
    assert dist_backend("cuda:0") == "gloo"
    monkeypatch.setenv("KDEP_DIST_BACKEND", "nccl")
    with pytest.raises(KdepError, match="KDEP_DIST_BACKEND=nccl needs a CUDA device"):
        dist_backend("cpu")
    monkeypatch.setenv("KDEP_DIST_BACKEND", "mpi")
    with pytest.raises(KdepError, match="KDEP_DIST_BACKEND='mpi' is not one of gloo, nccl"):
        dist_backend("cpu")
    monkeypatch.setenv("KDEP_DIST_TIMEOUT_S", "90")
    assert dist_timeout() == timedelta(seconds=90)
    monkeypatch.setenv("KDEP_DIST_TIMEOUT_S", "soon")
    with pytest.raises(KdepError, match="KDEP_DIST_TIMEOUT_S='soon' is not a positive number"):
        dist_timeout()


def _fake_group(monkeypatch) -> dict:
    """Record what init_distributed passes to torch.distributed instead of starting a process group."""
    calls: dict = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: "backend" in calls)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.update(kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.update(current=d))
    return calls


def test_init_binds_nccl_to_this_ranks_gpu_with_the_timeout(gpus, monkeypatch):
    gpus(2)
    _ranks(monkeypatch, 2, 1)
    monkeypatch.delenv("KDEP_DIST_BACKEND", raising=False)
    monkeypatch.setenv("KDEP_DIST_TIMEOUT_S", "120")
    calls = _fake_group(monkeypatch)
    job = init_distributed(str(pick_device("cuda")))
    assert (job.rank, job.world, job.local_rank) == (1, 2, 1)
    assert calls == {"backend": "nccl", "timeout": timedelta(seconds=120), "device_id": torch.device("cuda:1"),
                     "current": torch.device("cuda:1")}  # fmt: skip


def test_init_with_gloo_on_a_shared_gpu_passes_no_device_id(gpus, monkeypatch):
    gpus(1)
    _ranks(monkeypatch, 2, 1)
    monkeypatch.setenv("KDEP_DIST_BACKEND", "gloo")
    calls = _fake_group(monkeypatch)
    init_distributed(str(pick_device("auto")))
    assert calls["backend"] == "gloo" and "device_id" not in calls
    assert calls["current"] == torch.device("cuda:0")


def test_auto_amp_avoids_emulated_bf16(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_amp("auto", cuda) == "fp16"  # V100/T4: bf16 only emulated
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # a torch without the argument
    assert resolve_amp("auto", cuda) == "bf16"
    assert resolve_amp("auto", torch.device("cpu")) == "off" == resolve_amp("bf16", torch.device("cpu"))


@pytest.fixture
def tf32_flags():
    """Restore the global TF32 flags whatever the test does to them."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_amp_off_on_cuda_turns_tf32_off_and_each_run_sets_its_own(tf32_flags):
    cuda = torch.device("cuda")
    assert set_tf32(cuda, resolve_amp("bf16", cuda)) is True  # autocast: convolutions may use TF32
    assert (
        torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    )  # float32 matmuls: not
    assert set_tf32(torch.device("cpu"), resolve_amp("off", torch.device("cpu"))) is False
    assert torch.backends.cudnn.allow_tf32  # CPU: untouched
    assert set_tf32(cuda, resolve_amp("off", cuda)) is False
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    # the flags are process-global: a later run with autocast records (and gets) its own setting, not the last run's
    assert set_tf32(cuda, resolve_amp("bf16", cuda)) is True and torch.backends.cudnn.allow_tf32


def test_tf32_off_turns_both_flags_off_inside_and_restores_them(tf32_flags):
    with runtime.tf32_off():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32


def test_one_process_helpers_return_values_and_raise_the_original_error():
    assert gather_from_ranks(lambda: 7) == [7]
    assert on_every_rank(lambda: 8) == 8 and on_main_rank(lambda: 9) == 9
    with pytest.raises(ZeroDivisionError):
        gather_from_ranks(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        on_main_rank(lambda: 1 / 0)


WORKER = textwrap.dedent(
    """
    import os, sys
    from pipeline.runtime import RankError, gather_from_ranks, init_distributed, local_leader_first, on_main_rank, shutdown
    job = init_distributed("cpu")
    out = open(os.path.join(sys.argv[1], f"rank{job.rank}.txt"), "w")
    out.write(f"gathered {gather_from_ranks(lambda: job.rank * 10)}\\n")
    flag = os.path.join(sys.argv[1], "downloaded")

    def fetch():  # local rank 0 downloads; the others must find the file already there
        if os.path.exists(flag):
            return "cached"
        open(flag, "w").close()
        return "downloaded"

    out.write(f"leader {local_leader_first(fetch)}\\n")
    for name, fn in [("gather", lambda: gather_from_ranks(lambda: 1 / 0 if job.rank == 1 else 1)),
                     ("main", lambda: on_main_rank(lambda: open("/nonexistent/kdep"))),]:
        try:
            fn()
            out.write(f"{name} ok\\n")
        except (RankError, ZeroDivisionError, FileNotFoundError) as err:
            out.write(f"{name} {type(err).__name__}: {err}\\n")
    out.close()
    shutdown()
    """
)


def test_a_failure_on_one_rank_is_raised_on_every_rank_under_torchrun(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDEP_DIST_TIMEOUT_S": "30",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # fmt: skip
    start = time.monotonic()
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.monotonic() - start < 60
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text().splitlines() for r in (0, 1))
    assert rank0[:2] == ["gathered [0, 10]", "leader downloaded"]
    assert rank1[:2] == ["gathered [0, 10]", "leader cached"]
    assert rank0[2] == "gather RankError: rank 1 failed: ZeroDivisionError: division by zero"
    assert rank1[2] == "gather ZeroDivisionError: division by zero"
    assert rank0[3].startswith("main FileNotFoundError:")
    assert rank1[3].startswith("main RankError: rank 0 failed: FileNotFoundError:")


def test_a_world_of_one_under_torchrun_gets_a_process_group(tmp_path):
    """torchrun --nproc-per-node 1 runs the collectives too (an NCCL collective on a CPU tensor must fail on one GPU
    as it would on eight); a plain process gets none."""
    script = tmp_path / "one.py"
    script.write_text(textwrap.dedent("""
        import torch.distributed as dist
        from pipeline.runtime import init_distributed, shutdown
        job = init_distributed("cpu")
        print("group", dist.is_initialized(), job.rank, job.world)
        shutdown()
    """))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "1", str(script)], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and "group True 0 1" in proc.stdout, proc.stderr[-2000:]
    plain = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
    )
    assert plain.returncode == 0 and "group False 0 1" in plain.stdout, plain.stderr[-2000:]
