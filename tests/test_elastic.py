"""Fault tolerance across machines with torchrun: two elastic agents on this machine, as two nodes.

A worker is SIGKILLed in the middle of an epoch, twice; each time the agents restart the group,
which finds its run directory again by itself (no --resume), continues from the last checkpoint,
and the run ends with weights bit-identical to an uninterrupted one. A user who starts a new
launch on a run name that exists is still refused, on every restart.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fastresnet.testing import spawn_ranks
from fastresnet.training.checkpoint import load_checkpoint
from fastresnet.training.metrics import read_jsonl

REPO = Path(__file__).resolve().parent.parent
STEPS_PER_EPOCH = 12
# 3 epochs of 12 steps, 4 random 8-pixel images per rank and step: the steps cost nothing, the processes do
TRAIN = ["--data.backend", "synthetic", "--data.image_size", "8", "--data.batch_size", "4", "--data.num_classes", "10",
         "--data.synthetic_steps", str(STEPS_PER_EPOCH), "--data.synthetic_val_steps", "1", "--length", "3",
         "--log_every", "1", "--progress", "lines", "--plot", "false", "--device", "cpu", "--run_name", "elastic"]
KILL_AT_STEPS = (STEPS_PER_EPOCH + 3, 2 * STEPS_PER_EPOCH + 3)  # one kill in the middle of epochs 2 and 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agents:
    """`torchrun --nnodes=2 --nproc_per_node=1 --rdzv-backend=c10d ... -m fastresnet.train`, once per node,
    their output collected as it comes."""

    def __init__(self, out: Path, port: int, max_restarts: int = 3, nodes: int = 2) -> None:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc_per_node=1",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--max-restarts={max_restarts}",
                   "-m", "fastresnet.train", *TRAIN, "--out_dir", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.processes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True) for _ in range(nodes)]
        self.lines: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(p,), daemon=True) for p in self.processes]
        for reader in self.readers:
            reader.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def running(self) -> bool:
        return all(process.poll() is None for process in self.processes)

    def wait(self, timeout: float = 180) -> list[int]:
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.stop()
                pytest.fail(f"the agents did not finish within {timeout} s:\n{self.log}")
        for reader in self.readers:
            reader.join(timeout=10)
        return [process.returncode for process in self.processes]

    def stop(self) -> None:
        """SIGTERM: each agent stops its workers, then exits."""
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def worker_of(agent: subprocess.Popen) -> int | None:
    """The pid of the training process the agent started (its child running fastresnet.train)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent.pid and b"fastresnet.train" in command:
            return int(stat.parent.name)
    return None


def wait_for_step(metrics: Path, step: int, agents: Agents, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and agents.running():
        steps = [r["step"] for r in read_jsonl(metrics) if r.get("kind") == "train"]
        if steps and steps[-1] >= step:
            return steps[-1]
        time.sleep(0.02)
    agents.stop()
    pytest.fail(f"no training step {step} within {timeout} s:\n{agents.log}")


def _uninterrupted(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fastresnet.train import main

    assert main([*TRAIN, "--out_dir", out, "--progress", "off"]) == 0


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_never_interrupted(tmp_path):
    run = tmp_path / "elastic" / "elastic"
    agents = Agents(tmp_path / "elastic", free_port())
    killed_at = []
    for step in KILL_AT_STEPS:
        wait_for_step(run / "metrics.jsonl", step, agents)
        victim = agents.processes[len(killed_at) % 2]  # one node, then the other
        pid = worker_of(victim)
        assert pid is not None, "the agent has no training worker"
        os.kill(pid, signal.SIGKILL)
        killed_at.append(step)
    assert agents.wait() == [0, 0], agents.log
    log = agents.log
    resumed_from = [int(line.rsplit("step ", 1)[1]) for line in log.splitlines()
                    if line.startswith("restarted by torchelastic") and "from its checkpoint at step" in line]
    assert resumed_from == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH], log
    assert all(kill > start for kill, start in zip(killed_at, resumed_from, strict=True))

    spawn_ranks(_uninterrupted, str(tmp_path / "straight"))
    restarted, straight = load_checkpoint(run), load_checkpoint(tmp_path / "straight" / "elastic")
    assert restarted["step"] == straight["step"] == 3 * STEPS_PER_EPOCH
    for name, tensor in straight["model"].items():
        assert torch.equal(restarted["model"][name], tensor), f"{name} differs from the uninterrupted run"
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 3 * STEPS_PER_EPOCH + 1)), "each step logged once, in order"


@pytest.mark.slow
def test_a_new_launch_on_a_run_name_that_exists_is_refused_on_every_restart(tmp_path):
    run = tmp_path / "elastic"
    run.mkdir()
    (run / "config.json").write_text("{}")  # someone's earlier run
    agents = Agents(tmp_path, free_port(), max_restarts=1)
    refused = f"error: run directory {run} exists"
    deadline = time.monotonic() + 180
    while sum(refused in line for line in agents.lines) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)  # the first attempt and its restart, on both nodes
    agents.stop()  # what torchelastic does once its restarts are spent is its own business
    assert sum(refused in line for line in agents.lines) == 4, agents.log
    assert sorted(p.name for p in run.iterdir()) == ["config.json"] and (run / "config.json").read_text() == "{}"
