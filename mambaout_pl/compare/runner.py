"""Running a grid's run folders: here, in parallel processes on this machine, or as a Slurm job array.

A run is the CLI's own ``fit`` on the folder's ``settings.yaml`` (with ``--ckpt_path last`` when the
folder holds a ``last.ckpt`` of an earlier attempt), then ``validate`` of the final weights; its
costs are counted and measured on the way (:mod:`mambaout_pl.compare.costs`). Each result file is
written atomically: ``costs.json`` when the fit has finished, ``metrics.json`` when the run is done,
``failed.json`` when an attempt failed, so that any launcher's runs read the same way.

- :func:`run_attempt` runs one folder in this process and records how it ended (what a child
  process and a Slurm job run).
- :func:`run_local` runs folders ``jobs`` at a time, each in a new process (forked from a server
  that has imported the CLI once, so that each starts at once and its peak memory is its own).
- :func:`submit_slurm` submits folders as one job array through ``submitit`` (``mambaout-pl[cluster]``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from mambaout_pl.compare.errors import CompareError, short_error
from mambaout_pl.compare.grid import (
    COSTS_FILE,
    DONE,
    FAILED,
    FAILED_FILE,
    INTERRUPTED,
    LOG_FILE,
    METRICS_FILE,
    RUN_FILE,
    SETTINGS_FILE,
    run_status,
    write_json,
)

__all__ = ["execute_run", "run_attempt", "run_local", "submit_slurm", "INTERRUPT_CODES"]

#: Exit statuses of a run stopped by SIGINT or SIGTERM after saving its ``last.ckpt``: it resumes.
INTERRUPT_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)
COSTS_CALLBACK = "--trainer.callbacks+=mambaout_pl.compare.costs.TrainingCosts"


def run_cli(args: list[str]) -> Any:
    """The CLI on ``args`` (``mambaout compare``'s own command line is not the run's)."""
    from mambaout_pl.cli import run_cli as cli

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return cli(args)


def _last_checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("lightning_logs/version_*/checkpoints/last*.ckpt"))


def execute_run(folder: Path, stage: list[str] | None = None) -> dict[str, Any]:
    """Fit (unless ``costs.json`` says an earlier attempt finished it) and validate one run folder, in this process.

    ``stage`` (a one-item list) is kept at the step under way, ``fit``, ``costs`` or ``validate``, for
    the failure record. Returns the metrics written to ``metrics.json``.
    """
    from mambaout_pl.compare.costs import TrainingCosts, network_costs

    stage = stage if stage is not None else [""]
    folder = Path(folder)
    info = json.loads((folder / RUN_FILE).read_text())
    settings = f"--config={folder / SETTINGS_FILE}"
    costs_path = folder / COSTS_FILE
    if not costs_path.is_file():
        stage[0] = "fit"
        resume = ["--ckpt_path=last"] if _last_checkpoints(folder) else []
        started = time.perf_counter()
        cli = run_cli(
            [
                "fit",
                settings,
                f"--trainer.default_root_dir={folder}",
                "--trainer.enable_progress_bar=false",
                COSTS_CALLBACK,
                *resume,
            ]
        )
        seconds = time.perf_counter() - started
        stage[0] = "costs"
        trainer = cli.trainer
        last = [c.last_model_path for c in trainer.checkpoint_callbacks if getattr(c, "last_model_path", "")]
        if not last:
            raise CompareError(
                f"the fit of {folder} saved no last.ckpt to validate; keep the CLI's latest_checkpoint callback "
                "(and trainer.enable_checkpointing) on for a compare run."
            )
        measured = next(c for c in trainer.callbacks if isinstance(c, TrainingCosts))
        measurement = measured.measurement(cli.model.device)
        input_size = tuple(measurement["input_size"] or (info["size"], info["size"]))
        costs = {
            **measurement,
            **network_costs(cli.model.model, input_size, info["kind"]),
            "fit_seconds": seconds,
            "resumed": bool(resume),
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "checkpoint": str(Path(last[0]).resolve().relative_to(folder.resolve())),
        }
        write_json(costs_path, costs)
        del cli
    checkpoint = folder / json.loads(costs_path.read_text())["checkpoint"]
    stage[0] = "validate"
    validation = run_cli(
        [
            "validate",
            settings,
            f"--trainer.default_root_dir={folder / 'validate'}",
            "--trainer.enable_progress_bar=false",
            f"--ckpt_path={checkpoint}",
        ]
    )
    metrics = {
        key: float(value)
        for key, value in validation.trainer.callback_metrics.items()
        if getattr(value, "numel", lambda: 1)() == 1
    }
    monitor = info["monitor"]
    if monitor not in metrics:
        raise CompareError(f"validate of {folder} logged no {monitor} (it logged {sorted(metrics)}).")
    result = {"monitor": monitor, "mode": info["mode"], "value": metrics[monitor], "metrics": metrics}
    write_json(folder / METRICS_FILE, result)
    return result


@contextmanager
def _output_to(log: Path) -> Iterator[None]:
    """Send this process's standard output and error (file descriptors 1 and 2, and ``sys.stdout`` and
    ``sys.stderr``) to the end of ``log``."""
    import sys

    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "a", buffering=1) as file:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        try:
            with redirect_stdout(file), redirect_stderr(file):  # where sys.stdout is not descriptor 1
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for descriptor in saved:
                os.close(descriptor)


def run_attempt(folder: str | Path, threads: int | None = None, redirect: bool = True) -> int:
    """One attempt at a run folder; returns its exit status (0 done, 130/143 interrupted, 1 failed).

    A failure writes ``failed.json`` (stage, error, log) and the traceback to ``log.txt``; with
    ``redirect`` all of the attempt's output goes to ``log.txt`` too.
    """
    folder = Path(folder)
    (folder / FAILED_FILE).unlink(missing_ok=True)
    if threads:
        import torch

        torch.set_num_threads(threads)
    stage = ["start"]
    log = folder / LOG_FILE
    try:
        with _output_to(log) if redirect else _appending(log):
            print(f"=== attempt started {time.strftime('%Y-%m-%d %H:%M:%S')} in {folder}", flush=True)
            execute_run(folder, stage)
        return 0
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except SystemExit as exit_:
        if exit_.code in INTERRUPT_CODES:
            return int(exit_.code)
        error: BaseException = exit_
        message = f"the CLI exited with status {exit_.code}"
    except BaseException as caught:
        error = caught
        message = f"{type(caught).__name__}: {short_error(str(caught))}"
    with open(log, "a") as file:
        file.write("".join(traceback.format_exception(error)))
    write_json(folder / FAILED_FILE, {"stage": stage[0], "error": message, "log": LOG_FILE})
    return 1


@contextmanager
def _appending(log: Path) -> Iterator[None]:
    log.parent.mkdir(parents=True, exist_ok=True)
    yield


def describe_failure(folder: Path) -> str:
    """``failed in STAGE: ERROR; log: PATH`` from a run's ``failed.json``."""
    failure = json.loads((folder / FAILED_FILE).read_text())
    return f"failed in {failure['stage']}: {failure['error']}; log: {folder / failure['log']}"


def _child(folder: str, threads: int | None, device: int | None) -> None:
    """A run in a child process of its own (its own process group: signals come from the parent only)."""
    os.setpgid(0, 0)
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(device)
    raise SystemExit(run_attempt(folder, threads))


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["mambaout_pl.compare.runner", "mambaout_pl.cli"])
        return context
    return multiprocessing.get_context("spawn")


def default_threads(jobs: int) -> int | None:
    """Torch threads per run: this machine's cores shared out among ``jobs`` runs (None: torch decides)."""
    if jobs <= 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)


def run_local(
    folders: Sequence[Path],
    jobs: int = 1,
    threads: int | None = None,
    report: Callable[[str], None] = print,
    processes: bool = True,
) -> dict[Path, str]:
    """Run ``folders`` (skipping done ones) ``jobs`` at a time; returns each folder's status afterwards.

    A failed run is reported (arm, size, seed, error and log) and the others go on. SIGINT or SIGTERM
    is passed on to the running runs, which save their ``last.ckpt`` and stop; no new run starts.
    ``processes=False`` runs them one after the other in this process (no isolation of memory).
    """
    if jobs < 1:
        raise CompareError(f"--jobs {jobs}: give 1 or more runs at once.")
    pending = [Path(folder) for folder in folders if run_status(Path(folder)) != DONE]
    total = len(pending)
    labels = {folder: _label(folder) for folder in pending}
    threads = threads if threads is not None else default_threads(jobs)
    started: dict[Path, float] = {}

    def finished(folder: Path, code: int) -> None:
        if code not in (0, *INTERRUPT_CODES) and run_status(folder) != FAILED:
            write_json(folder / FAILED_FILE, {"stage": "process", "error": f"exit status {code}", "log": LOG_FILE})
        status = run_status(folder)
        seconds = time.perf_counter() - started[folder]
        if status == DONE:
            metrics = json.loads((folder / METRICS_FILE).read_text())
            report(f"done    {labels[folder]}: {metrics['monitor']} {metrics['value']:.4f} ({seconds:.0f} s)")
        elif status == FAILED:
            report(f"FAILED  {labels[folder]}: {describe_failure(folder)}")
        else:
            report(f"stopped {labels[folder]} after {seconds:.0f} s: it resumes from its last.ckpt when run again")

    if not processes:
        for index, folder in enumerate(pending, 1):
            report(f"[{index}/{total}] start {labels[folder]}{_resuming(folder)}")
            started[folder] = time.perf_counter()
            code = run_attempt(folder, threads, redirect=False)
            finished(folder, code)
            if code in INTERRUPT_CODES:
                break
        return {folder: run_status(folder) for folder in map(Path, folders)}

    context = _context()
    devices = _device_count()
    running: dict[Any, tuple[Path, Any]] = {}
    queue = list(pending)
    stopping: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    try:
        index = 0
        while queue or running:
            while queue and len(running) < jobs and not stopping:
                folder = queue.pop(0)
                index += 1
                slot = index % devices if devices > 1 else None
                process = context.Process(target=_child, args=(str(folder), threads, slot), daemon=False)
                report(f"[{index}/{total}] start {labels[folder]}{_resuming(folder)}")
                started[folder] = time.perf_counter()
                process.start()
                running[process.sentinel] = (folder, process)
            if stopping:
                for _, process in running.values():
                    _signal(process, stopping[-1])
                stopping.clear()
                queue.clear()
            try:
                ready = wait(list(running), timeout=1.0)
            except KeyboardInterrupt:
                stopping.append(signal.SIGINT)
                report("interrupted: the running runs save their last.ckpt and stop; run the command again to resume")
                continue
            for sentinel in ready:
                folder, process = running.pop(sentinel)
                process.join()
                finished(folder, process.exitcode if process.exitcode >= 0 else 128 - process.exitcode)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return {folder: run_status(folder) for folder in map(Path, folders)}


def _signal(process: Any, signum: int) -> None:
    try:
        os.kill(process.pid, signum)
    except ProcessLookupError:
        pass


def _device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _label(folder: Path) -> str:
    info = json.loads((folder / RUN_FILE).read_text())
    return f"arm {info['arm']}, size {info['size']}, seed {info['seed']}"


def _resuming(folder: Path) -> str:
    if run_status(folder) == INTERRUPTED:
        return " (validation of its finished fit)" if (folder / COSTS_FILE).is_file() else " (resuming its last.ckpt)"
    return " (again: its last attempt failed)" if run_status(folder) == FAILED else ""


def submit_slurm(
    folders: Sequence[Path],
    out: Path,
    parameters: Mapping[str, Any],
    threads: int | None = None,
    cluster: str = "slurm",
) -> list[Any]:
    """Submit the runs of ``folders`` that are not done as one job array; returns submitit's jobs.

    ``parameters`` go to ``submitit.AutoExecutor.update_parameters`` (``timeout_min``,
    ``gpus_per_node``, ``cpus_per_task``, ``slurm_partition``, ``slurm_array_parallelism``, ...).
    The job ids are written to ``OUT/slurm/jobs.json``; each job writes its run folder as a local
    run does, so ``mambaout compare --report`` aggregates them the same way. ``cluster`` is
    submitit's: ``"local"`` or ``"debug"`` run the jobs on this machine (without a Slurm scheduler).
    """
    try:
        import submitit
    except ImportError as error:
        raise CompareError(
            "--launcher slurm needs submitit: pip install 'mambaout-pl[cluster]' (or pip install submitit)."
        ) from error
    pending = [str(folder) for folder in folders if run_status(Path(folder)) != DONE]
    if not pending:
        return []
    try:
        executor = submitit.AutoExecutor(folder=Path(out) / "slurm" / "%j", cluster=cluster)
    except (RuntimeError, ValueError) as error:
        raise CompareError(
            f"--launcher slurm: {error}. Run it where Slurm's sbatch is, or use --launcher local."
        ) from error
    executor.update_parameters(name=f"compare-{Path(out).name}", **parameters)
    jobs = executor.map_array(run_attempt, pending, [threads] * len(pending))
    write_json(
        Path(out) / "slurm" / "jobs.json",
        [{"job_id": str(job.job_id), "folder": folder} for job, folder in zip(jobs, pending)],
    )
    return jobs
