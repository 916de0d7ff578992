"""Dataloader workers leave SIGTERM and SIGINT to the main process, and still end when it ends them."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mambaout_pl.data.workers import init_worker


class Numbers(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(0.05)
        return torch.tensor(index)


def is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="workers ignore SIGTERM only where sigwaitinfo exists")
def test_workers_outlive_signals_from_other_processes_and_end_when_their_main_process_ends_them() -> None:
    loader = DataLoader(Numbers(), batch_size=2, num_workers=2, worker_init_fn=init_worker)
    iterator = iter(loader)
    batches = [next(iterator)]
    workers = list(iterator._workers)
    for signum in (signal.SIGTERM, signal.SIGINT):
        for worker in workers:  # sent by another process, as `kill`, `timeout` or a scheduler would
            subprocess.run(["kill", f"-{signum.name[3:]}", str(worker.pid)], check=True)
    time.sleep(0.5)
    assert all(is_running(worker.pid) for worker in workers)
    batches += list(iterator)
    assert torch.cat(batches).tolist() == list(range(8))

    other = iter(DataLoader(Numbers(), batch_size=2, num_workers=1, worker_init_fn=init_worker))
    next(other)
    (worker,) = other._workers
    worker.terminate()  # SIGTERM from the main process itself, as multiprocessing sends at exit
    worker.join(timeout=10)
    assert worker.exitcode == 0
    other._shutdown_workers()
