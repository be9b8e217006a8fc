"""
Where a script runs: one code path for a CPU, one GPU and many GPUs or nodes (house rule 5).
Under torchrun (which sets RANK and WORLD_SIZE) a script joins the process group and runs as one
rank of many; started plainly, it is rank 0 of 1, and nothing here touches torch.distributed.
It imports only files.py (for its one-line errors), so train.py, sample.py and caption.py all
stand on it.

    distributed         context manager: -> (rank, world, device); the process group is left
                        however the script ends, so a rank that fails never hangs the others
    mean_across_ranks   a tensor averaged over the ranks (in place), as it is in one process
    hardware_defaults   what --precision and --compile mean when left out, decided for the device:
                        bf16 and torch.compile only where they work
    autocast            the precision context: bf16 autocast on a GPU that has bf16, else plain fp32
    computed_once       rank 0 fills a cache, the other ranks wait for it and then read it
"""
import importlib.util
import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from files import UserError


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


def hardware_defaults(device, precision=None, compile=None):
    """
    -> (precision, compile, notice): --precision and --compile as given, or where left out (None)
    what this device runs well, and a one-line notice of what was turned off and why (else None).
    bf16 autocast by default on CUDA from compute capability 8.0 (A100, RTX 30xx and newer); older
    GPUs (V100, T4, RTX 20xx) have no bf16 tensor cores and Triton's kernels crash on it there,
    so they get fp32. torch.compile by default on CUDA only when Triton, its GPU compiler, is
    installed (not on Windows) and supports the card (compute capability 7.0 or more). On the
    CPU: fp32, not compiled, unless asked for. A flag the GPU cannot honour is a UserError.
    """
    if device.type != "cuda":
        return precision or "fp32", bool(compile), None
    cap, name = torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device)
    card = f"{name} (compute capability {cap[0]}.{cap[1]})"
    has_bf16 = cap >= (8, 0)
    has_triton = importlib.util.find_spec("triton") is not None and cap >= (7, 0)
    if precision == "bf16" and not has_bf16:
        raise UserError(f"--precision bf16: {card} has no bf16 (it needs compute capability 8.0 or more); "
                        f"pass --precision fp32, or leave it out")
    if compile and not has_triton:
        why = "Triton supports compute capability 7.0 or more" if cap < (7, 0) else "pip install triton (Linux)"
        raise UserError(f"--compile: torch.compile on {card} needs Triton ({why}); drop --compile")
    notice = []
    if precision is None and not has_bf16:
        notice.append(f"{card} has no bf16: training in fp32")
    if compile is None and not has_triton:
        notice.append(f"torch.compile is off: {card} " + ("is older than Triton supports (7.0)" if cap < (7, 0)
                                                           else "has no Triton here (pip install triton, Linux only)"))
    return (precision or ("bf16" if has_bf16 else "fp32"), has_triton if compile is None else compile,
            "; ".join(notice) or None)


def autocast(device, precision=None):
    """
    The context the networks run under (house rule 6). bf16 by default on a GPU that has it
    (hardware_defaults): its exponent range is fp32's, so unlike fp16 it needs no GradScaler;
    weights, optimizer state and loss terms stay fp32. Plain fp32 by default on the CPU, where
    bf16 is slower, and on GPUs without bf16. precision="bf16" on the CPU runs the GPU's
    mixed-precision code path (the tests use it to catch dtype mistakes).
    """
    precision = precision or hardware_defaults(device)[0]
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
