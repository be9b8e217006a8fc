"""What the ranks of a large run promise each other: a caption cache is written a batch at a time,
never held whole in memory; every rank encodes its share of a cache, and the cache is the one a
single process writes; no rank waits on a slow one inside a collective (which would time out), and
a failure reaches the ranks waiting on it; folders that only rank 0 sees are refused at the start;
sample.py's ranks write their own parts of the .npz, joined into the file one process writes,
without gathering images over the process group; and caption.py's ranks may end far apart."""
import contextlib
import gc
import glob
import json
import os
import subprocess
import sys
import types
import zlib

import numpy as np
import pytest
import torch

import train
from test_caption import folder, tiny_vlm  # noqa: F401 (fixtures)
from textok import TextEncoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(script, port, *args):
    """`script` with `args` on 2 gloo ranks of one machine, as torchrun starts them."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", str(script), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)


class FakeEncoder(TextEncoder):
    """A text encoder that needs no model, of width 16: a caption's embedding is a pure function of its
    crc32, so that caches written by one process and by two ranks can be compared (the scripts below
    import it from here)."""

    def __init__(self, name, max_length, device="cpu"):
        self.name, self.max_length, self.device, self.dim = name, max_length, torch.device(device), 16
        self._warned = True

    def __call__(self, captions):
        seeds = [zlib.crc32(c.encode()) for c in captions]
        emb = torch.stack([torch.randn(self.max_length, self.dim, generator=torch.Generator().manual_seed(s))
                           for s in seeds])  # (B, L, D)
        lengths = torch.tensor([s % self.max_length for s in seeds])  # (B,), one less than each caption's
        mask = torch.arange(self.max_length)[None] <= lengths[:, None]  # (B, L)
        return emb * mask[..., None], mask


def tensor_bytes():
    """Bytes held by every torch tensor alive in this process."""
    return sum(t.numel() * t.element_size() for t in gc.get_objects() if issubclass(type(t), torch.Tensor))


def stub_run(cache_dir, rank=0, world=1):
    """What text_cache and latent_cache read of train.Run."""
    return types.SimpleNamespace(args=types.SimpleNamespace(cache_dir=str(cache_dir)), rank=rank, world=world,
                                 master=rank == 0, device=torch.device("cpu"), autocast=contextlib.nullcontext())


def test_the_caption_cache_is_written_a_batch_at_a_time_never_held_whole(tmp_path, monkeypatch):
    # ImageNet's captions by T5-XL are 670 GB: the cache must go to the disk as it is computed. Each
    # time the encoder is called, the tensors alive in the process hold at most about two batches.
    captions = [f"caption number {i}" for i in range(2000)]
    held = []

    class Watched(FakeEncoder):
        def __call__(self, batch):
            held.append(tensor_bytes())
            return super().__call__(batch)
    monkeypatch.setattr(train, "TextEncoder", Watched)
    emb, mask = train.text_cache(stub_run(tmp_path / "cache"), captions, "fake", 32)
    batch = 64 * 32 * 16 * 4  # text_cache's 64 captions x 32 tokens x 16 channels, fp32
    # About 1.5 batches here; held whole, the cache would reach 31 fp16 batches (16 fp32 ones) by the last call.
    assert len(held) == 32 and max(held) - held[0] <= 3 * batch, (max(held) - held[0]) / batch
    # ... and the cache holds every caption's embedding, fp16 and memory-mapped, as before.
    want_emb, want_mask = FakeEncoder("fake", 32)(captions[1990:])
    assert emb.shape == (2000, 32, 16) and emb.dtype == np.float16 and isinstance(emb, np.memmap)
    np.testing.assert_array_equal(emb[1990:], want_emb.half().numpy())
    np.testing.assert_array_equal(mask[1990:], want_mask.numpy())
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(os.path.basename(p) for p in (emb.filename, mask.filename))


def test_encode_all_yields_each_batch_as_the_encoder_gives_it():
    captions = [f"caption {i}" for i in range(10)]
    enc = FakeEncoder("fake", 8)
    batches = list(enc.encode_all(captions, batch_size=4, progress=False))
    assert [len(e) for e, _ in batches] == [4, 4, 2] and all(e.dtype == torch.float16 for e, _ in batches)
    torch.testing.assert_close(torch.cat([e for e, _ in batches]), enc(captions)[0].half(), rtol=0, atol=0)


CACHES = '''
from test_scale_ranks import FakeEncoder
import contextlib, datetime, json, os, sys, time, types
import torch, torch.distributed as dist
import devices, train
from data import ShapesDataset
from files import UserError
from textok import TexTok, make_config

out, slow = sys.argv[1], float(sys.argv[2])
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
if world > 1:  # a short timeout: a rank that waited in a collective for a slow rank 0 would fail
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3))

class Slow(FakeEncoder):
    def __call__(self, captions):
        if rank == 0:
            time.sleep(slow)  # rank 0 takes longer than the timeout over its share
        return super().__call__(captions)
train.TextEncoder = Slow
run = types.SimpleNamespace(args=types.SimpleNamespace(cache_dir=os.path.join(out, "cache")), rank=rank, world=world,
                            master=rank == 0, device=torch.device("cpu"), autocast=contextlib.nullcontext())
data = ShapesDataset(40, 16)
text = train.text_cache(run, data.captions, "fake", 8, batch_size=8)  # 5 batches: 2 for rank 0, 3 for rank 1
torch.manual_seed(0)
tok = TexTok(make_config("TexTok-T", image_size=16, patch_size=4, num_tokens=4, text_dim=16, text_len=8)).eval()
train.latent_cache(run, tok, data, text, ["test"], batch_size=8)
result = {}
if world > 1:
    def boom(tag):
        if rank == 0:
            raise ValueError("the encoder ran out of memory")
    try:  # rank 0 fails: rank 1, waiting for the cache, stops with its error instead of waiting forever
        devices.computed_once(rank, world, os.path.join(out, "failed", "done"), boom, None)
    except Exception as e:
        result["failed"] = f"{type(e).__name__}: {e}"
    try:  # each rank given a folder of its own, as another machine's disk would be
        devices.check_shared(rank, {"--cache-dir": os.path.join(out, f"disk-of-rank-{rank}")})
    except UserError as e:
        result["unshared"] = str(e)
    devices.check_shared(rank, {"--out": out})  # one both see: fine
    dist.destroy_process_group()
with open(os.path.join(out, f"result-{rank}.json"), "w") as f:
    json.dump(result, f)
'''


def test_two_ranks_share_the_caches_work_and_write_what_one_process_writes(tmp_path):
    script = tmp_path / "caches.py"
    script.write_text(f"import sys\nsys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]\n" + CACHES)
    subprocess.run([sys.executable, str(script), tmp_path / "one", "0"], cwd=ROOT, env=ENV, check=True,
                   capture_output=True)
    # Rank 0 sleeps 2.5 s per batch of its two, 5 s in all, past the process group's 3 s timeout:
    # rank 1, done in well under a second, waits for it on the cache's files, not in a barrier.
    two = torchrun(script, 29541, tmp_path / "two", 2.5)
    assert two.returncode == 0, two.stderr[-3000:]
    files = sorted(os.listdir(tmp_path / "one" / "cache"))
    assert len(files) == 4 and sorted(os.listdir(tmp_path / "two" / "cache")) == files  # no notes or temp files left
    for name in files:  # the text cache and the latents: the bytes one process writes
        a, b = (tmp_path / run / "cache" / name for run in ("one", "two"))
        if name.endswith(".npy"):
            assert a.read_bytes() == b.read_bytes(), name
        else:  # the statistics: summed per rank, then across ranks
            sa, sb = json.loads(a.read_text()), json.loads(b.read_text())
            assert sa["images"] == sb["images"] == 40
            np.testing.assert_allclose(sa["mean"] + sa["std"], sb["mean"] + sb["std"], rtol=1e-12)
    results = [json.loads((tmp_path / "two" / f"result-{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["failed"] == "ValueError: the encoder ran out of memory"
    assert results[1]["failed"].startswith("RuntimeError: rank 0 failed while building done: ValueError: the encoder")
    assert not glob.glob(str(tmp_path / "two" / "failed" / "*.tmp"))
    for r in (0, 1):  # every rank says it, in one line naming the flag
        assert results[r]["unshared"].startswith(f"--cache-dir {tmp_path / 'two' / f'disk-of-rank-{r}'}: rank(s) 1 "
                                                 f"do not see the files rank 0 writes there")


def test_a_cache_cut_off_before_its_last_file_is_computed_again_and_a_finished_one_read(tmp_path, monkeypatch):
    class Counted(FakeEncoder):
        calls = 0

        def __call__(self, captions):
            Counted.calls += 1
            return super().__call__(captions)
    monkeypatch.setattr(train, "TextEncoder", Counted)
    run, captions = stub_run(tmp_path), [f"c {i}" for i in range(100)]  # two batches of 64
    emb, mask = train.text_cache(run, captions, "fake", 8)
    os.remove(mask.filename)  # the file written last: as if the run had been killed before it
    again = train.text_cache(run, captions, "fake", 8)
    assert Counted.calls == 4 and np.array_equal(again[0], emb)
    train.text_cache(run, captions, "fake", 8)
    assert Counted.calls == 4  # read, not computed


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    """A tiny text-to-image DiT (one step) on a tiny tokenizer (one step)."""
    root = tmp_path_factory.mktemp("ranks-dit")
    common = ["--image-size", "16", "--num-images", "32", "--val-images", "4", "--num-workers", "0",
              "--eval-every", "1000", "--save-every", "1000", "--steps", "1", "--cache-dir", str(root / "cache")]
    train.main(["--patch-size", "4", "--num-tokens", "8", "--text-len", "32", "--batch-size", "8",
                "--lpips-weight", "0", "--gan-weight", "0", "--out", str(root / "tok"), *common])
    train.main(["--stage", "dit", "--tokenizer", str(root / "tok" / "tokenizer"), "--batch-size", "8",
                "--out", str(root / "dit"), *common])
    return root / "dit" / "dit"


# sample.py as each rank runs it, with every object collective refusing more than 512 bytes (two of
# the test's images): the ranks agree on a name through them, but images never travel over the group.
SAMPLE = '''
import pickle
import torch.distributed as dist
for name in ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list"):
    def small_only(*args, _name=name, _real=getattr(dist, name), **kwargs):
        assert len(pickle.dumps((args, kwargs))) < 512, f"{_name} was handed images"
        return _real(*args, **kwargs)
    setattr(dist, name, small_only)
import sample
sample.run_main(sample.main)
'''


def test_sample_npz_from_two_ranks_is_the_one_process_file_without_gathering_images(dit_folder, tmp_path):
    import sample
    flags = ["--dit", dit_folder, "--steps", "2", "--num-samples", "5", "--batch-size", "2"]
    sample.main([*map(str, flags), "--out", str(tmp_path / "one.npz")])
    script = tmp_path / "sample_rank.py"
    script.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\n" + SAMPLE)
    two = torchrun(script, 29542, *flags, "--out", tmp_path / "two.npz")  # batches: rows 0-1 to rank 0, 2-4 to rank 1
    assert two.returncode == 0, two.stderr[-3000:]
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as both:
        assert one.files == both.files == ["arr_0", "prompts"] and one["arr_0"].shape == (5, 16, 16, 3)
        for k in one.files:
            assert one[k].dtype == both[k].dtype and np.array_equal(one[k], both[k]), k
    assert sorted(os.listdir(tmp_path)) == ["one.npz", "sample_rank.py", "two.npz"]  # the parts are gone


def test_a_sample_npz_cut_off_mid_write_leaves_the_previous_file_and_no_other(tmp_path):
    import sample

    class Killed:  # a rank's part that a Ctrl-C interrupts as it is read
        shape = (300, 4, 4, 3)

        def __len__(self):
            return 300

        def __getitem__(self, rows):
            raise KeyboardInterrupt
    path = tmp_path / "s.npz"
    path.write_bytes(b"the previous samples")
    with pytest.raises(KeyboardInterrupt):
        sample.write_npz(str(path), [np.zeros((300, 4, 4, 3), np.uint8), Killed()], [(None, "a prompt", None)] * 600,
                         t2i=True)
    assert os.listdir(tmp_path) == ["s.npz"] and path.read_bytes() == b"the previous samples"


# caption.py as each rank runs it: a process group that gives up after 3 s, and a rank 1 that
# finishes its share 6 s after rank 0 (its one batch of readable images; a real run's ranks can end
# hours apart).
CAPTION = '''
import datetime, os, time
import torch.distributed as dist
join = dist.init_process_group
dist.init_process_group = lambda backend, **kwargs: join(backend, timeout=datetime.timedelta(seconds=3))
import caption
if os.environ["RANK"] == "1":
    call = caption.Captioner.__call__
    caption.Captioner.__call__ = lambda self, images: time.sleep(6) or call(self, images)
caption.run_main(caption.main)
'''


def test_caption_ranks_end_apart_and_rank_0_merges_once_all_are_done(folder, tiny_vlm, tmp_path):
    import caption
    caption.main([str(folder), "--out", str(tmp_path / "one.jsonl"), "--model", tiny_vlm, "--batch-size", "2"])
    script = tmp_path / "caption_rank.py"
    script.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\n" + CAPTION)
    two = torchrun(script, 29543, folder, "--out", tmp_path / "two.jsonl", "--model", tiny_vlm, "--batch-size", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    one, both = ([json.loads(line) for line in open(tmp_path / f"{n}.jsonl")] for n in ("one", "two"))
    assert both == sorted(one, key=lambda r: r["file"]) and len(both) == 5  # every readable image, once
    assert not glob.glob(str(tmp_path / "two.jsonl.*.rank*"))  # the ranks' notes are gone
