"""Running a `kdep` command at a given world size, for the world-size matrix (tests/test_world_matrix.py).

- world 1: in this process, through the same command line (typer's CliRunner), with no process group;
- world 2: ``torchrun --standalone --nproc-per-node 2`` (two gloo ranks on the CPU, a free port);
- "2 nodes": two ``torchrun --nnodes 2 --nproc-per-node 1`` launchers, one per simulated node, meeting at a c10d
  rendezvous on 127.0.0.1 (ranks are given in arrival order).

Every launch has a short collective timeout, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

BIN = Path(sys.executable).parent
LAUNCH_TIMEOUT_S = 300  # one launch, all ranks
ENV = {"OMP_NUM_THREADS": "1", "KDEP_DIST_TIMEOUT_S": "120"}


@dataclass
class Outcome:
    """What a launch returned: exit status (the worst over launchers), all output, wall seconds."""

    code: int
    output: str
    seconds: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_kdep(world: int | str, *args: str, env: dict | None = None) -> Outcome:
    """``kdep ARGS`` at ``world`` = 1, 2 or "2 nodes"."""
    start = time.monotonic()
    if world == 1:
        from stages.cli import app

        result = CliRunner().invoke(app, list(args))
        output = result.output + (
            f"\n{result.exception!r}" if result.exception and result.exit_code != 1 else ""
        )
        return Outcome(result.exit_code, output, time.monotonic() - start)
    full_env = {**os.environ, **ENV, **(env or {})}
    kdep = [str(BIN / "kdep"), *args]
    if world == 2:
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python", *kdep]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=LAUNCH_TIMEOUT_S)
        return Outcome(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start)
    if world == "2 nodes":
        port = free_port()
        rdzv = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-id", f"kdep-{port}",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--no-python"]  # fmt: skip
        launchers = [subprocess.Popen([str(BIN / "torchrun"), *rdzv, *kdep], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env=full_env) for _ in range(2)]  # fmt: skip
        outputs = [p.communicate(timeout=LAUNCH_TIMEOUT_S)[0] for p in launchers]
        code = max(abs(p.returncode) for p in launchers)
        return Outcome(code, "\n".join(outputs), time.monotonic() - start)
    raise ValueError(f"world {world!r}")
