"""The CUDA path against the CPU references: caches made on the GPU verify on CPU (bf16, fp16, and float32 with TF32
off), the store does not depend on workers, training steps make no host sync, fp16 students keep their own
GradScalers, the online teacher equals the cache, and NCCL/gloo process groups run the stages. Marked `gpu`: they
are skipped without a CUDA device and are not part of `make test` (run `pytest -m gpu` on a GPU machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import store_bytes

from pipeline.cache.store import open_store
from pipeline.cache.verify import verify_store
from pipeline.data.shards import list_shards
from pipeline.projection.artefact import load_projection
from pipeline.student.pairs import StreamSpec
from pipeline.student.specs import LossSpec
from pipeline.student.trainees import make_optimizer
from pipeline.student.training import StepContext, Student, train_step, views_on_device
from stages.cache_teacher import CacheTeacherConfig
from stages.cache_teacher import run as cache_run
from stages.fit_svd import FitSvdConfig
from stages.fit_svd import run as fit_run
from stages.train_student import TrainStudentConfig
from stages.train_student import run as train_run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
BIN = Path(sys.executable).parent


def _cache(shards, out, weights, **kw) -> Path:
    base = dict(shards=str(shards), out=str(out), teacher="resnet18", weights=str(weights), views=3, resolution=64,
                batch_size=12, workers=0, device="cuda", quiet=True)  # fmt: skip
    cache_run(CacheTeacherConfig(**{**base, **kw}))
    return Path(out)


@pytest.fixture(scope="module")
def gpu_cache(demo_shards, teacher_file, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gc")
    cache = _cache(demo_shards["train"], d / "cache.zarr", teacher_file, amp="bf16")
    fit_run(FitSvdConfig(cache=str(cache), out=str(d / "proj.npz"), dim=512, quiet=True))
    return {"dir": d, "cache": cache, "proj": d / "proj.npz", "shards": demo_shards["train"]}


@pytest.mark.parametrize(("amp", "tolerance"), [("bf16", None), ("fp16", None), ("off", 2e-3)])
def test_a_cache_made_on_cuda_verifies_on_cpu(demo_shards, teacher_file, tmp_path, amp, tolerance):
    cache = _cache(demo_shards["train"], tmp_path / f"{amp}.zarr", teacher_file, amp=amp)
    store = open_store(cache)
    assert store.provenance["compute"]["amp"] == amp
    assert store.provenance["compute"]["tf32"] is (amp != "off")
    report = verify_store(store, samples=12, seed=0, tolerance=tolerance)
    assert report.ok, f"max rel error {report.max_rel_error:.3g} above {report.tolerance:.3g}"


def test_the_cuda_store_does_not_depend_on_workers_or_an_interruption(demo_shards, teacher_file, tmp_path):
    a = _cache(demo_shards["train"], tmp_path / "w0.zarr", teacher_file, workers=0)
    b = _cache(demo_shards["train"], tmp_path / "w3.zarr", teacher_file, workers=3)
    assert store_bytes(a) == store_bytes(b)
    c = tmp_path / "resumed.zarr"
    _cache(demo_shards["train"], c, teacher_file, workers=3)
    sorted((c / "markers").glob("*.json"))[
        -1
    ].unlink()  # as if the run died before the last shard was durable
    _cache(demo_shards["train"], c, teacher_file, workers=3)
    assert store_bytes(c) == store_bytes(a)


def test_three_training_steps_make_no_host_sync_and_keep_fp32_targets(gpu_cache):
    device = torch.device("cuda")
    torch.manual_seed(0)
    student = (
        Student("resnet18", "pre_relu", "kdep", 512, 64).to(device).to(memory_format=torch.channels_last)
    )
    opt = make_optimizer(student, 0.05, 1e-4)
    ctx = StepContext(device, "bf16", LossSpec("kdep", 3.0), channels_last=True)
    proj = load_projection(gpu_cache["proj"])  # its tensors follow the input's device
    x8 = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8).pin_memory()
    rows = torch.randn(8, 512, dtype=torch.float16).pin_memory()
    losses = []
    train_step(student, opt, views_on_device(x8, ctx), proj.targets(rows.to(device).float()), ctx)  # warm-up
    torch.cuda.synchronize()  # constants and projection tensors are on the device now, cuDNN has its plans
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            x = views_on_device(x8, ctx)
            target = proj.targets(rows.to(device, non_blocking=True).float())
            loss, _ = train_step(student, opt, x, target, ctx, to_host=False)
            losses.append(loss)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert x.is_contiguous(memory_format=torch.channels_last) and target.dtype == torch.float32
    assert all(loss.dtype == torch.float32 and loss.device.type == "cuda" for loss in losses)
    assert student.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(torch.stack(losses)).all()


def test_loader_batches_arrive_pinned_as_uint8(gpu_cache):
    from pipeline.student.loaders import LoaderSpec, PairLoaders

    paths = tuple(s.path for s in list_shards(gpu_cache["shards"]))
    stream = StreamSpec(
        store=str(gpu_cache["cache"]),
        shard_paths=paths,
        tap="pre_relu",
        resolution=64,
        seed=0,
        uint8_views=True,
    )
    loaders = PairLoaders(LoaderSpec(stream, 8, 2, True), open_store(gpu_cache["cache"]))
    x, rows, _ = next(iter(loaders.for_epoch(0)))
    assert x.is_pinned() and rows.is_pinned() and x.dtype == torch.uint8


def _train(cache: dict[str, Path], out: Path, **kw) -> dict:
    base = dict(cache=str(cache["cache"]), projection=(str(cache["proj"]),), student=("resnet18",), out=str(out),
                epochs=2, batch_size=8, workers=2, device="cuda", quiet=True, lr=0.05)  # fmt: skip
    return train_run(TrainStudentConfig(**{**base, **kw}))


def test_two_fp16_students_keep_their_own_grad_scalers_and_export_strictly(gpu_cache, tmp_path):
    out = tmp_path / "two"
    _train(
        gpu_cache, out, student=("resnet18", "resnet18"), projection=(str(gpu_cache["proj"]),) * 2, amp="fp16"
    )
    state = torch.load(sorted((out / "checkpoints").glob("epoch-*.pt"))[-1], weights_only=False)
    assert set(state["scalers"]) == {"resnet18-0", "resnet18-1"}
    scales = [s["scale"] for s in state["scalers"].values()]
    assert all(s > 0 for s in scales)
    for name in ("resnet18-0", "resnet18-1"):
        model = torchvision.models.resnet18()
        model.fc = torch.nn.Identity()
        model.load_state_dict(torch.load(out / f"backbone-{name}.pt"), strict=True)


def test_kill_and_resume_on_cuda_ends_near_the_straight_run(gpu_cache, tmp_path):
    """A resume must use the same settings (epochs included: the lr schedule depends on them), so the "kill" is
    what one during epoch 3's checkpoint leaves: the run's files without epoch 3's checkpoint, export and done.json."""
    run = tmp_path / "run"
    _train(gpu_cache, run, epochs=3)
    a = torch.load(run / "backbone-resnet18.pt")
    for name in ("done.json", "backbone-resnet18.pt", "checkpoints/epoch-0002.pt"):
        (run / name).unlink()
    _train(gpu_cache, run, epochs=3)
    b = torch.load(run / "backbone-resnet18.pt")
    for key in a:  # cuDNN backward is not bitwise deterministic
        torch.testing.assert_close(b[key].float(), a[key].float(), atol=1e-3, rtol=1e-3)


def test_online_teacher_targets_equal_the_cached_rows(gpu_cache):
    from torch.utils.data import DataLoader

    from pipeline.cache.join import rebuild_teacher
    from pipeline.student.pairs import PairStream

    paths = tuple(s.path for s in list_shards(gpu_cache["shards"]))
    stream = PairStream(StreamSpec(store=str(gpu_cache["cache"]), shard_paths=paths, tap="pre_relu", resolution=64,
                                   seed=0, shuffle_buffer=0))  # fmt: skip
    x, rows, _ = next(iter(DataLoader(stream, batch_size=12)))
    teacher = rebuild_teacher(open_store(gpu_cache["cache"]), ("pre_relu",)).to("cuda")
    ctx = StepContext(torch.device("cuda"), "bf16", LossSpec("kdep", 3.0), teacher=teacher)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        live = teacher(views_on_device(x, ctx))["pre_relu"].float()
    cos = torch.nn.functional.cosine_similarity(live, rows.to("cuda").float(), dim=1)
    assert cos.min() > 0.999


def _torchrun(n: int, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(n), "--no-python", str(BIN / "kdep"),
           *args]  # fmt: skip
    return subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout
    )


def test_nccl_world_of_one_runs_stage_1_and_a_stage_3_epoch(gpu_cache, demo_shards, teacher_file, tmp_path):
    """Any CPU tensor in an NCCL collective raises: a world of one under torchrun gets an NCCL process group
    (pipeline.runtime.init_distributed) and goes through every collective."""
    cache = tmp_path / "nccl.zarr"
    proc = _torchrun(1, "cache-teacher", "--shards", str(demo_shards["train"]), "--out", str(cache), "--teacher",
                     "resnet18", "--weights", str(teacher_file), "--views", "3", "--resolution", "64",
                     "--batch-size", "12", "--amp", "bf16", "--device", "cuda", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert store_bytes(cache) == store_bytes(gpu_cache["cache"])
    proc = _torchrun(1, "train-student", "--cache", str(gpu_cache["cache"]), "--projection", str(gpu_cache["proj"]),
                     "--out", str(tmp_path / "s"), "--epochs", "1", "--batch-size", "8", "--device", "cuda", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_ranks_on_one_gpu_with_gloo(gpu_cache, demo_shards, teacher_file, tmp_path):
    """NCCL refuses two ranks on one device; KDEP_DIST_BACKEND=gloo lets them share it for this test."""
    gloo = {
        "KDEP_DIST_BACKEND": "gloo",
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")[:1],
    }
    cache = tmp_path / "two.zarr"
    proc = _torchrun(2, "cache-teacher", "--shards", str(demo_shards["train"]), "--out", str(cache), "--teacher",
                     "resnet18", "--weights", str(teacher_file), "--views", "3", "--resolution", "64",
                     "--batch-size", "12", "--amp", "bf16", "--device", "cuda", "--quiet", env=gloo)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert store_bytes(cache) == store_bytes(gpu_cache["cache"])
    proc = _torchrun(2, "train-student", "--cache", str(gpu_cache["cache"]), "--student", "resnet18",
                     "--student", "resnet18", "--projection", str(gpu_cache["proj"]), "--projection",
                     str(gpu_cache["proj"]), "--amp", "fp16", "--out", str(tmp_path / "s"), "--epochs", "1",
                     "--batch-size", "4", "--device", "cuda", "--quiet", env=gloo)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_bench_on_cuda_finishes(tmp_path):
    proc = subprocess.run([str(BIN / "kdep"), "bench", "--device", "cuda", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(tmp_path.glob("*.json"))


def test_the_demo_teacher_trains_on_cuda_and_saves_cpu_weights(demo_shards, tmp_path):
    """`kdep demo-teacher --device cuda` (the GPU study profiles train their teacher so): one epoch on the GPU,
    weights saved as CPU tensors that load into the torchvision model strictly."""
    from stages.config import DemoTeacherConfig
    from stages.demo_teacher import run as teacher_run

    out = tmp_path / "teacher.pt"
    teacher_run(DemoTeacherConfig(train=str(demo_shards["train"]), out=str(out), epochs=1, resolution=32,
                                  device="cuda", quiet=True))  # fmt: skip
    state = torch.load(out)
    assert all(v.device.type == "cpu" for v in state.values())
    torchvision.models.resnet18(num_classes=4).load_state_dict(state, strict=True)
