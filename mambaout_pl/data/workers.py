"""Dataloader worker processes that leave SIGTERM and SIGINT to the main process.

``timeout``, ``kill -- -PGID``, SLURM and Ctrl+C in a terminal signal every process of the job,
dataloader workers included. A worker ended by such a signal ends the run with a
``DataLoader worker ... is killed by signal`` error before the main process can save a
checkpoint. So workers ignore SIGINT, and SIGTERM unless their own main process sends it (as
``multiprocessing`` does to end workers left at exit): the main process's handler
(``PreemptionCheckpoint``) decides when to stop, and stopping shuts the workers down.
"""

from __future__ import annotations

import os
import signal
import threading

from lightning.fabric.utilities.seed import pl_worker_init_function


def init_worker(worker_id: int) -> None:
    """``worker_init_fn`` of every loader: leave SIGINT and SIGTERM to the main process, then seed as Lightning would."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # not on macOS or Windows: there a signalled worker still ends the run
        # Blocked here, SIGTERM stays blocked in every thread this worker starts; one thread takes it instead.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), name="sigterm", daemon=True).start()
    # Lightning adds its seeding only to loaders without a ``worker_init_fn`` (``seed_everything(workers=True)``).
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id)


def _exit_on_sigterm_from(parent: int) -> None:
    """Exit on a SIGTERM sent by ``parent``; take and drop any other sender's."""
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)
