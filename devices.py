"""
Where a script runs: one code path for a CPU, one GPU and many GPUs or nodes (house rule 5).
Under torchrun (which sets RANK and WORLD_SIZE) a script joins the process group and runs as one
rank of many; started plainly, it is rank 0 of 1, and nothing here touches torch.distributed.
It imports nothing of the project, so train.py, sample.py and caption.py all stand on it.

    distributed         context manager: -> (rank, world, device); the process group is left
                        however the script ends, so a rank that fails never hangs the others
    mean_across_ranks   a tensor averaged over the ranks (in place), as it is in one process
    autocast            the precision context: bf16 autocast on CUDA, plain fp32 on the CPU
    computed_once       rank 0 fills a cache, the other ranks wait for it and then read it
"""
import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist


@contextmanager
def distributed():
    """
    (rank, world size, device). With RANK/WORLD_SIZE set: nccl on CUDA, gloo on the CPU (nccl
    needs GPUs), each rank on GPU LOCAL_RANK of its node; the process group is destroyed on the
    way out. Without them: (0, 1, the GPU if there is one, else the CPU).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        yield 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)  # before the group forms, so nccl binds each rank to its own GPU
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield rank, world, torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    finally:
        dist.destroy_process_group()


def mean_across_ranks(t):
    """The mean of `t` over all ranks, in place (an all-reduce); `t` itself in one process."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def autocast(device, precision=None):
    """
    The context the networks run under (house rule 6). bf16 by default on CUDA: its exponent
    range is fp32's, so unlike fp16 it needs no GradScaler; weights, optimizer state and loss
    terms stay fp32. Plain fp32 by default on the CPU, where bf16 is slower. precision="bf16" on
    the CPU runs the GPU's mixed-precision code path (the tests use it to catch dtype mistakes).
    """
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def computed_once(rank, done, compute):
    """Rank 0 runs compute() unless `done`, the file a cache writes last, exists; every rank then
    waits at a barrier, so none reads the cache before it is complete. (Eight ranks encoding the
    same captions would do the work eight times and race to write it.)"""
    if rank == 0 and not os.path.exists(done):
        os.makedirs(os.path.dirname(os.path.abspath(done)), exist_ok=True)
        compute()
    if dist.is_initialized():
        dist.barrier()
