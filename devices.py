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
    computed_once       every rank fills its share of a cache, rank 0 completes it, the others
                        wait for it (not in a collective: it can take hours) and then read it
    Handoff             ranks telling each other through files that their share is done, or failed
    share               a rank's rows of some work: whole batches, as one process makes them
    from_rank0          rank 0's value on every rank, for decisions they must share
    check_shared        that every rank sees the folders rank 0 writes (several machines)
"""
import glob
import importlib.util
import json
import os
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from files import UserError, first_line


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


#################################################################################
#          Work shared by the ranks, handed over through files                  #
#################################################################################
# A cache can take hours (T5-XL over ImageNet's captions), and ranks can finish their shares of it
# hours apart. No rank waits for another inside a collective for that long: NCCL's barrier gives up
# after 10 minutes, and its watchdog then kills the job. They wait on files instead (Handoff), which
# is also why every folder they hand files through must be one that all ranks see (check_shared).

POLL_S = 1.0  # how often a waiting rank looks for the file it waits on
SAY_EVERY_S = 300.0  # and how often it says that it still waits


def from_rank0(value):
    """Rank 0's `value` on every rank (a broadcast), `value` itself in one process: for what all
    ranks must agree on. A collective, so only where every rank arrives at about the same time."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def share(n, batch, rank, world):
    """Rank `rank`'s rows of n rows of work: a run of whole batches of `batch` rows, the same batches
    one process makes (so the result does not depend on the number of ranks), as even as they allow."""
    batches = -(-n // batch)
    first, last = rank * batches // world, (rank + 1) * batches // world
    return range(min(first * batch, n), min(last * batch, n))


class Handoff:
    """
    The ranks of one run telling each other, through small files beside `base`, that their share of
    some work (`what`) is done, or failed. Rank r writes base.<tag>.rank<r>.json, where the tag is a
    name this run's ranks share and no other run has: a note left by an earlier run (or written by
    another run filling the same cache) is never taken for this one's. Rank 0 removes the notes it
    has read. `with Handoff(...) as hand:` notes an exception as this rank's failure: a rank waiting
    on it then stops with that error, where it would have waited forever (the note stays behind).
    """

    def __init__(self, base, rank, world, what):
        self.base, self.rank, self.world, self.what = base, rank, world, what
        self.tag = from_rank0(os.urandom(4).hex())

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is not None and self.world > 1:  # one process has nobody to tell
            try:
                self._write(error=first_line(e))
            except OSError:
                pass  # a full disk, say: the error being raised is the one to see
        return False

    def note_path(self, r):
        return f"{self.base}.{self.tag}.rank{r}.json"

    def _write(self, **fields):
        path = self.note_path(self.rank)
        with open(f"{path}.tmp", "w") as f:
            json.dump(fields, f)
        os.replace(f"{path}.tmp", path)  # a reader finds all of the note or none of it

    def _read(self, r):
        """Rank r's note of this run (None while there is none); a noted failure is raised here."""
        try:
            with open(self.note_path(r)) as f:
                note = json.load(f)
        except (OSError, ValueError):
            return None
        if "error" in note:
            raise RuntimeError(f"rank {r} failed while {self.what}: {note['error']} (its output says more)")
        return note

    def wait(self, ready, whom):
        """ready()'s value, polled until it is not None, saying now and then that this rank still waits."""
        start = said = time.time()
        while (value := ready()) is None:
            if time.time() - said >= SAY_EVERY_S:
                said = time.time()
                print(f"rank {self.rank}: waiting for {whom} ({self.what}), {(said - start) / 60:.0f} min so far",
                      flush=True)
            time.sleep(POLL_S)
        return value

    def send(self, summary=None):
        """This rank's share is done; `summary` (anything JSON writes) goes to rank 0's gather."""
        self._write(summary=summary)

    def gather(self, summary=None):
        """Rank 0: [its own summary, rank 1's, ...], once every rank has sent its share."""
        notes = {}

        def ready():
            for r in range(1, self.world):
                if r not in notes and (note := self._read(r)) is not None:
                    notes[r] = note["summary"]
            return notes if len(notes) == self.world - 1 else None
        self.wait(ready, "the other ranks")
        for r in notes:
            os.remove(self.note_path(r))
        return [summary] + [notes[r] for r in range(1, self.world)]

    def wait_for_file(self, path):
        """Until rank 0 has written `path`, or noted that it failed."""
        def ready():
            self._read(0)  # raises if rank 0 failed
            return True if os.path.exists(path) else None
        self.wait(ready, "rank 0")


def temporary(path, tag):
    """The name under which a cache's file `path` is filled by the run of `tag` (computed_once)."""
    return f"{path}.{tag}.tmp"


def computed_once(rank, world, done, compute, finish):
    """
    A cache built once by every rank together (house rule 8), unless `done`, the file it writes last,
    is there already. Each rank runs compute(tag): it fills its share of the cache's files under their
    temporary() names and returns a summary of it (anything JSON writes); rank 0 then runs
    finish(tag, summaries, one per rank), which renames the files into place and writes `done` last,
    while the other ranks wait for `done` (a cache cut off mid-write is never read, and is computed
    again). If any rank fails, rank 0 removes the temporary files and every rank stops with the error.
    """
    if from_rank0(os.path.exists(done)):  # rank 0 decides for all: no rank may skip work another waits on
        return
    os.makedirs(os.path.dirname(os.path.abspath(done)), exist_ok=True)
    hand = Handoff(done, rank, world, f"building {os.path.basename(done)}")
    try:
        with hand:
            summary = compute(hand.tag)
            if rank == 0:
                finish(hand.tag, hand.gather(summary))
            else:
                hand.send(summary)
                hand.wait_for_file(done)
    except BaseException:
        if rank == 0:
            folder = glob.escape(os.path.dirname(os.path.abspath(done)))
            for tmp in glob.glob(temporary(os.path.join(folder, "*"), hand.tag)):  # this run's, no other's
                os.remove(tmp)
        raise


def check_shared(rank, folders):
    """
    That every rank sees the files rank 0 writes in `folders` ({flag: folder}), else one line naming
    the flag: the caches and checkpoints that rank 0 completes are read by every rank, so on several
    machines they must be on a filesystem all of them share (NFS, Lustre, ...). Checked at the start,
    in seconds; without it, a second machine would fail an hour in, on a missing cache file.
    """
    if not dist.is_initialized():
        return
    tag = from_rank0(os.urandom(4).hex())
    marks = [os.path.join(folder, f".shared-{tag}") for folder in folders.values()]
    if rank == 0:
        for mark in marks:
            os.makedirs(os.path.dirname(os.path.abspath(mark)), exist_ok=True)
            open(mark, "w").close()
    dist.barrier()  # at the start of a run: every rank is here within seconds
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, [os.path.exists(mark) for mark in marks])  # once it returns, all have looked
    if rank == 0:
        for mark in marks:
            os.remove(mark)
    for k, (flag, folder) in enumerate(folders.items()):
        blind = [r for r, saw in enumerate(seen) if not saw[k]]
        if blind:
            raise UserError(f"{flag} {folder}: rank(s) {', '.join(map(str, blind[:4]))} do not see the files rank 0 "
                            f"writes there (another machine's own disk?); on several machines, put "
                            f"{' and '.join(folders)} on a filesystem that all of them share (NFS, Lustre, ...)")
