"""Running a test's worker as `world` CPU processes on torch.distributed's gloo backend.

The parent spawns the workers, joins them with a timeout (a hang fails, it never blocks the suite) and
asserts that every one exited 0; a worker that raised leaves its traceback, one that died of a signal
leaves the faulthandler dump of its threads, and both are in the failure message.

After destroy_process_group every worker checks that no gloo thread of torch's ("pt_gloo_runloop",
"gloo_tcp_loop") is left: destroy joins them only when nothing else references the process group, and a
left-over worker thread can abort the interpreter's exit ("terminate called without an active exception",
rank 0 of the MoE test in one CI run: the thread released a finished work's Python tensors while Python was
finalizing; core dump backtrace in docs/moe.md). What had kept the group alive was torch's own lazy import
of torch._dynamo at our first custom-op call; fastcore_ai.ops now imports it up front.

Rendezvous goes through a FileStore in the test's tmp dir, so no port has to be probed for (a free port
found by binding and closing a socket can be taken by another process before rank 0 listens on it).
"""

import faulthandler
import os
import traceback
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STORE_TIMEOUT_S = 60


@contextmanager
def gloo_process_group(rank: int, world: int, out_dir: str):
    """The default process group for one worker; ends with a barrier (no rank tears gloo down while
    another still communicates) and destroy_process_group."""
    dist.init_process_group(
        "gloo",
        init_method="file://" + os.path.join(out_dir, "rendezvous"),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=STORE_TIMEOUT_S),
    )
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _gloo_threads() -> list:
    """Names of this process's threads that belong to gloo ([] where /proc is not available)."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return []
    names = []
    for task in os.listdir(tasks):
        try:
            with open(os.path.join(tasks, task, "comm")) as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(name for name in names if "gloo" in name)


def _bootstrap(rank: int, world: int, out_dir: str, worker, args):
    fault_log = open(os.path.join(out_dir, f"fault_rank{rank}.txt"), "w")
    faulthandler.enable(fault_log, all_threads=True)
    torch.set_num_threads(1)
    try:
        with gloo_process_group(rank, world, out_dir):
            worker(rank, world, out_dir, *args)
            running = _gloo_threads()
        left = _gloo_threads()
        # the names are torch's: the check after destroy means something only if it sees them before
        assert running or not os.path.isdir("/proc/self/task"), (
            f"rank {rank}: no gloo thread seen while the group is live"
        )
        assert not left, (
            f"rank {rank}: gloo threads {left} still run after destroy_process_group (something "
            "still references the process group)"
        )
    except BaseException:
        with open(os.path.join(out_dir, f"error_rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_gloo_workers(worker, world: int, out_dir: str, args=(), timeout_s: float = 120.0) -> None:
    """Run worker(rank, world, out_dir, *args) in `world` spawned processes inside one gloo process group;
    `worker` must be a module-level function (spawn pickles it by name). Fails the test unless every
    process exits 0 within timeout_s."""
    # Not a skip: torch's builds for every platform this project supports include gloo, and the distributed
    # layers' tests must not pass silently where it is missing.
    assert dist.is_available() and dist.is_gloo_available(), "torch.distributed with the gloo backend is not available"
    context = mp.get_context("spawn")
    procs = [
        context.Process(target=_bootstrap, args=(rank, world, out_dir, worker, tuple(args))) for rank in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout_s)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    reports = ""
    for name in sorted(os.listdir(out_dir)):
        if name.startswith(("error_rank", "fault_rank")):
            with open(os.path.join(out_dir, name)) as f:
                text = f.read()
            if text:
                reports += f"\n--- {name}\n{text}"
    assert not hung, f"gloo workers hung (killed after {timeout_s} s){reports}"
    codes = [p.exitcode for p in procs]
    assert all(code == 0 for code in codes), f"gloo worker exit codes {codes}{reports}"
