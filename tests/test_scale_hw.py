"""What the hardware defaults and the input pipeline promise (issue 26): bf16 and torch.compile only
where the GPU runs them, flags given still winning; a sweep in one process compiles each run afresh;
the loader's workers persist across epochs and bring the caption rows, and a run reads the same
batches with workers as without; the built-in set is drawn once and a real set checked once."""
import contextlib
import os
import pickle

import numpy as np
import pytest
import torch

import data
import devices
import reproduce
import train
from conftest import captioned_folder
from files import UserError

#################################################################################
#                               Hardware defaults                               #
#################################################################################


@pytest.fixture
def gpu(monkeypatch):
    """A pretend GPU: gpu(capability, triton) makes torch report that card, and Triton installed or not."""
    def make(capability, triton=True):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Pretend GPU")
        find_spec = devices.importlib.util.find_spec
        installed = lambda name, *a: (object() if triton else None) if name == "triton" else find_spec(name, *a)
        monkeypatch.setattr(devices.importlib.util, "find_spec", installed)
        return torch.device("cuda", 0)
    return make


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # torch.autocast("cuda") made on a CPU-only machine
@pytest.mark.parametrize("capability,triton,precision,compiled,notice", [
    ((9, 0), True, "bf16", True, None),                 # H100: everything on
    ((8, 6), False, "bf16", False, "no Triton"),        # an RTX 3090 on Windows: bf16, eager
    ((7, 5), True, "fp32", True, "has no bf16"),        # T4 / RTX 20xx: no bf16, Triton compiles fp32
    ((6, 0), True, "fp32", False, "older than Triton"),  # P100: neither
])
def test_defaults_turn_on_only_what_the_gpu_runs(gpu, capability, triton, precision, compiled, notice):
    device = gpu(capability, triton)
    got = devices.hardware_defaults(device)
    assert got[:2] == (precision, compiled)
    assert got[2] is None if notice is None else notice in got[2]
    # the context every script runs its networks under follows the same decision
    amp = devices.autocast(device)
    if precision == "fp32":
        assert isinstance(amp, contextlib.nullcontext)
    else:
        assert amp.fast_dtype == torch.bfloat16


def test_flags_given_win_and_what_the_gpu_cannot_run_is_one_line(gpu):
    assert devices.hardware_defaults(torch.device("cpu")) == ("fp32", False, None)
    assert devices.hardware_defaults(torch.device("cpu"), "bf16", True) == ("bf16", True, None)  # the tests' path
    device = gpu((9, 0))
    assert devices.hardware_defaults(device, "fp32", False) == ("fp32", False, None)
    device = gpu((7, 5), triton=False)
    with pytest.raises(UserError, match=r"--precision bf16: Pretend GPU \(compute capability 7.5\) has no bf16"):
        devices.hardware_defaults(device, "bf16")
    with pytest.raises(UserError, match="--compile: .* needs Triton"):
        devices.hardware_defaults(device, None, True)
    assert devices.hardware_defaults(device, "fp32", False) == ("fp32", False, None)  # asked for: no notice


def test_train_on_a_t4_defaults_to_fp32_uncompiled_and_says_so(gpu, tmp_path, capsys):
    device = gpu((7, 5), triton=False)
    run = train.Run(train.get_args(["--out", str(tmp_path)]), 0, 1, device)
    assert not run.compile and isinstance(run.autocast, contextlib.nullcontext)
    assert "note: Pretend GPU (compute capability 7.5) has no bf16: training in fp32" in capsys.readouterr().out


#################################################################################
#                         A sweep in one process (reproduce)                    #
#################################################################################

def test_each_in_process_run_of_a_sweep_starts_with_a_fresh_compiler(tmp_path, monkeypatch):
    # Without the reset, the 9th run compiled in one process would hit Dynamo's recompile limit and
    # quietly run uncompiled.
    calls = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: calls.append("reset"))
    monkeypatch.setattr(train, "main", lambda argv: calls.append("train"))
    monkeypatch.setattr(reproduce, "evaluate_run", lambda folder, args, seed: {})
    args = reproduce.get_args(["--out", str(tmp_path / "sweep"), "--results", str(tmp_path / "res")])
    for run in reproduce.plan(args)[:2]:
        reproduce.run_one(run, args, threads=1)
    assert calls == ["reset", "train", "reset", "train"]


#################################################################################
#                                   The loader                                  #
#################################################################################

class WorkerPid(torch.utils.data.Dataset):
    """The built-in images, labelled with the pid of the process that loaded each."""

    def __init__(self, n):
        self.shapes = data.ShapesDataset(n, 8)

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, i):
        return self.shapes[i][0], i, os.getpid()


def caption_cache(tmp_path, n, length=12, width=6):
    """A caption cache as train.text_cache returns one: memory-mapped fp16 rows and their masks."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "emb.npy", rng.standard_normal((n, length, width)).astype(np.float16))
    np.save(tmp_path / "mask.npy", np.arange(length)[None] < rng.integers(2, length, (n, 1)))
    return np.load(tmp_path / "emb.npy", mmap_mode="r"), np.load(tmp_path / "mask.npy", mmap_mode="r")


def read_all(run, dataset, workers, text, steps):
    out = []
    for batch in run.batches(dataset, workers, text):
        out.append(batch)
        run.step += 1
    assert run.step == steps
    return out


def test_workers_persist_across_epochs_and_bring_the_caption_rows(tmp_path):
    # 12 images, batch 4: 3 steps an epoch, 9 steps are 3 epochs. Workers started once serve them all
    # (before: new workers every epoch); with or without workers, the batches and caption rows are those
    # the main process would read, trimmed to each batch's longest caption.
    text = caption_cache(tmp_path, 12)
    args = train.get_args(["--steps", "9", "--batch-size", "4", "--out", str(tmp_path / "out")])
    batches = {}
    for workers in (0, 2):
        run = train.Run(args, 0, 1, torch.device("cpu"))
        batches[workers] = read_all(run, WorkerPid(12), workers, text, 9)
    pids = {p for _, _, lab, _, _ in batches[2] for p in lab.tolist()}
    assert len(pids) == 2 and os.getpid() not in pids
    for (x0, i0, _, t0, m0), (x2, i2, _, t2, m2) in zip(batches[0], batches[2]):
        assert torch.equal(x0, x2) and torch.equal(i0, i2)
        want_t, want_m = data.fetch_text(text, i0, "cpu", trim=True)  # the rows as a step read them before
        for got_t, got_m in ((t0, m0), (t2, m2)):
            assert got_t.dtype == torch.float32 and torch.equal(got_t, want_t) and torch.equal(got_m, want_m)
    assert sorted(i for _, idx, *_ in batches[0][:3] for i in idx.tolist()) == list(range(12))  # one epoch each


def test_the_loader_pickles_a_memory_map_as_its_path(tmp_path):
    # A spawned worker (macOS, Windows) is sent the collate by pickle: the cache must travel as its path,
    # not as a copy of every caption row (670 GB for T5-XL on ImageNet), and read the same rows there.
    emb, mask = caption_cache(tmp_path, 64, length=32, width=64)
    collate = data.WithText((emb, mask), trim=True)
    sent = pickle.dumps(collate)
    assert len(sent) < emb.nbytes / 10
    items = [(torch.zeros(3, 2, 2), i, -1) for i in (5, 17, 3)]
    for a, b in zip(collate(items), pickle.loads(sent)(items)):
        assert torch.equal(a, b)


def tiny_run(tmp_path, name, *extra):
    flags = ["--image-size", "16", "--patch-size", "4", "--num-tokens", "2", "--text-len", "32", "--num-images", "16",
             "--val-images", "4", "--batch-size", "4", "--steps", "6", "--eval-every", "6", "--log-every", "2",
             "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / name), *extra]
    train.main(flags)
    return torch.load(tmp_path / name / "ckpt-latest.pt", weights_only=True)["model"]


def test_a_run_with_loader_workers_is_the_run_without(tmp_path):
    # 6 steps of 4 of 16 images cross an epoch; the workers draw the images and read the caption rows.
    a, b = tiny_run(tmp_path, "w0", "--num-workers", "0"), tiny_run(tmp_path, "w2", "--num-workers", "2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


#################################################################################
#                        Work a second start need not redo                      #
#################################################################################

def test_the_builtin_set_is_drawn_once_into_the_cache(tmp_path, monkeypatch):
    fresh = data.ShapesDataset(10, 16, seed=4)
    items = [fresh[i] for i in range(10)]  # drawn now, item by item
    drawn = data.ShapesDataset(10, 16, seed=4, cache_dir=str(tmp_path))
    for i, (image, index, label) in enumerate(items):  # the very tensors drawing each image gives
        assert torch.equal(drawn[i][0], image) and drawn[i][1:] == (index, label)
    assert len(list(tmp_path.glob("shapes-*.npy"))) == 1
    monkeypatch.setattr(data, "render", lambda *a: pytest.fail("drawn again"))
    again = data.ShapesDataset(10, 16, seed=4, cache_dir=str(tmp_path))
    assert all(torch.equal(again[i][0], items[i][0]) for i in range(10))
    assert torch.equal(pickle.loads(pickle.dumps(again))[3][0], items[3][0])  # a spawned worker maps the file


def test_a_folders_images_are_decoded_once_until_one_changes(tmp_path, monkeypatch):
    root, caps = captioned_folder(tmp_path, 6, lambda i: (40 * i, 0, 0), lambda i: f"red {i}")
    (root / "03.png").write_bytes(b"not a png")
    cache = str(tmp_path / "cache")
    checked = []
    problem = data.image_problem
    monkeypatch.setattr(data, "image_problem", lambda path, size: (checked.append(path), problem(path, size))[1])
    first = data.CaptionedImages(str(root), str(caps), 8, skip_bad=True, progress=False, cache_dir=cache)
    assert len(checked) == 6 and first.skipped == 1 and "03.png" not in first.files
    # A second start reads the record: nothing decoded, the same images kept, the bad one still refused.
    second = data.CaptionedImages(str(root), str(caps), 8, skip_bad=True, progress=False, cache_dir=cache)
    assert len(checked) == 6 and second.files == first.files and second.skipped == 1
    with pytest.raises(UserError, match="03.png: unreadable image"):
        data.CaptionedImages(str(root), str(caps), 8, progress=False, cache_dir=cache)
    assert len(checked) == 6
    # An image replaced (here: repaired) changes the key: every image is checked again.
    from PIL import Image
    Image.new("RGB", (20, 20), (1, 2, 3)).save(root / "03.png")
    os.utime(root / "03.png", ns=(1, 1))
    assert len(data.CaptionedImages(str(root), str(caps), 8, progress=False, cache_dir=cache)) == 6
    assert len(checked) == 12


def test_shards_are_decoded_once(tmp_path, monkeypatch):
    root, caps = captioned_folder(tmp_path, 8, lambda i: (0, 30 * i, 0), lambda i: f"green {i}")
    data.write_shards(data.CaptionedImages(str(root), str(caps), 16, progress=False), str(tmp_path / "shards"), 16,
                      per_shard=4, progress=False)
    checked = []
    problem = data.bytes_problem
    monkeypatch.setattr(data, "bytes_problem", lambda b, size: (checked.append(1), problem(b, size))[1])
    a = data.open_dataset(str(tmp_path / "shards"), image_size=16, progress=False, cache_dir=str(tmp_path / "c"))
    b = data.open_dataset(str(tmp_path / "shards"), image_size=16, progress=False, cache_dir=str(tmp_path / "c"))
    assert len(checked) == 8 and a.names == b.names and len(b) == 8
    assert torch.equal(a[5][0], b[5][0])


def _build_data_on_rank(rank, root, caps, cache, port, out):
    """One of two gloo ranks building train.py's data; writes how many images it decoded to check them."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    checked, problem = [], data.image_problem
    data.image_problem = lambda path, size: (checked.append(path), problem(path, size))[1]
    dist.init_process_group("gloo")
    try:
        args = train.get_args(["--data", root, "--captions", caps, "--cache-dir", cache])
        train_set, _, _ = train.build_data(args, 16, master=rank == 0)
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(f"{len(checked)} {len(train_set)}")
    finally:
        dist.destroy_process_group()


def test_under_torchrun_only_the_first_rank_decodes_the_images(tmp_path):
    import socket
    root, caps = captioned_folder(tmp_path, 10, lambda i: (0, 0, 20 * i), lambda i: f"blue {i}")
    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_build_data_on_rank, args=(str(root), str(caps), str(tmp_path / "cache"), port,
                                                           str(tmp_path)), nprocs=2)
    counts = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert counts == [["10", "9"], ["0", "9"]]  # rank 1 read rank 0's record: the same 9 training images
