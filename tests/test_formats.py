"""What reading webdataset shards and Parquet promises: the same images give the same dataset, split
and training step as a folder; every pattern names the same shards; keys and columns as img2dataset
and the Hugging Face hub write them; and one line naming the shard and the key for bad data."""
import io
import json
import os
import sys
import tarfile

import pytest
import torch
from PIL import Image

import data
import eval_fid
import train
from files import MissingFile, UserError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

# test_train.py's tiny run, the GAN and LPIPS off (they do not change what is read), one step.
TINY = ["--image-size", "16", "--patch-size", "4", "--num-tokens", "8", "--text-len", "32", "--val-images", "8",
        "--batch-size", "8", "--num-workers", "0", "--lpips-weight", "0", "--gan-weight", "0", "--warmup-steps", "2",
        "--log-every", "1", "--eval-every", "1000", "--save-every", "1000", "--steps", "1"]


def png(color, size=(20, 20)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def color(i):
    return (4 * i, 255 - 4 * i, (37 * i) % 256)  # 64 different images


def write_tar(path, samples):
    """samples: [(key, {ext: bytes})] as webdataset members KEY.ext, in that order."""
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, payload in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def three_formats(tmp_path, n=64, labels=False):
    """The same n captioned images (image i: colour(i), 'colour i', class i % 3) as a folder + caption
    file, as 4 webdataset shards (KEY.png, KEY.txt, KEY.cls) and as one Parquet file in the hub's
    layout (image {"bytes", "path"}, text, label). -> (folder, captions, shard folder, Parquet file)."""
    folder, shards = tmp_path / "imgs", tmp_path / "shards"
    os.makedirs(folder)
    os.makedirs(shards)
    lines, samples = [], []
    for i in range(n):
        (folder / f"{i:02d}.png").write_bytes(png(color(i)))
        lines.append(json.dumps({"file": f"{i:02d}.png", "caption": f"colour {i}", **({"label": i % 3} if labels else {})}))
        samples.append((f"{i:02d}", {"png": png(color(i)), "txt": f"colour {i}".encode(),
                                     **({"cls": str(i % 3).encode()} if labels else {})}))
    (tmp_path / "caps.jsonl").write_text("\n".join(lines) + "\n")
    per = n // 4
    for s in range(4):
        write_tar(shards / f"{s:05d}.tar", samples[s * per:(s + 1) * per])
    table = {"image": [{"bytes": png(color(i)), "path": f"{i:02d}.png"} for i in range(n)],
             "text": [f"colour {i}" for i in range(n)], **({"label": [i % 3 for i in range(n)]} if labels else {})}
    pq.write_table(pa.table(table), tmp_path / "data.parquet", row_group_size=16)
    return folder, tmp_path / "caps.jsonl", shards, tmp_path / "data.parquet"


def first_loss(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r][0]["loss"]


@pytest.mark.parametrize("labels", [False, True])
def test_a_folder_shards_and_parquet_of_the_same_images_train_the_same_first_step(tmp_path, labels):
    folder, caps, shards, parquet = three_formats(tmp_path, labels=labels)
    sources = {"folder": [str(folder), "--captions", str(caps)], "shards": [str(shards)], "parquet": [str(parquet)]}
    cond = ["--cond", "class"] if labels else []  # with labels, the run reads them (a class embedding)
    splits, loss = {}, {}
    for name, flags in sources.items():
        args = train.get_args(["--data", *flags, "--val-images", "8"])
        train_set, val_set, hflip = train.build_data(args, 16, master=False)
        splits[name] = (train_set.captions, val_set.captions, train_set.labels, val_set.labels)
        assert hflip  # real data: flips on, whatever the format
        out = tmp_path / f"run-{name}"
        train.main(TINY + ["--data", *flags, "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *cond])
        loss[name] = first_loss(out)
    # The same 58 / 6 split (a tenth held out), the same captions and labels, in the same order ...
    assert splits["folder"] == splits["shards"] == splits["parquet"]
    assert len(splits["folder"][0]) == 58 and len(splits["folder"][1]) == 6
    assert (splits["folder"][2] is not None) == labels
    # ... the same first step, and one caption-embedding cache (train + held-out) for all three.
    assert loss["folder"] == loss["shards"] == loss["parquet"], loss
    if not labels:
        assert len([f for f in os.listdir(tmp_path / "cache") if f.startswith("text-")]) == 4
    # eval_fid.py recon scores the held-out split of each run's own data, read from its args.json.
    for name in ("shards", "parquet"):
        held_out, which = eval_fid.held_out_images(str(tmp_path / f"run-{name}" / "tokenizer"), 16)
        assert held_out.captions == splits[name][1] and "held-out images" in which


def test_recon_scores_a_shard_run_and_names_its_images(tmp_path):
    _, _, shards, _ = three_formats(tmp_path, n=16)
    out = tmp_path / "run"
    train.main(TINY + ["--data", str(shards), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                       "--batch-size", "4"])
    res = eval_fid.main(["recon", "--tokenizer", str(out / "tokenizer"), "--no-lpips"])  # 1 held out: no rFID
    assert res["num_images"] == 1 and res["captions"]["psnr"] > 0
    assert res["files"][0].startswith("0000") and ".tar/" in res["files"][0]  # the shard and the key


def test_every_way_of_naming_shards_finds_the_same_files(tmp_path):
    _, _, shards, parquet = three_formats(tmp_path, n=8)
    tars = [str(shards / f"{s:05d}.tar") for s in range(4)]
    assert data.data_format(str(shards)) == ("shards", tars)
    assert data.data_format(str(shards / "*.tar")) == ("shards", tars)
    assert data.data_format(str(shards / "{00000..00003}.tar")) == ("shards", tars)
    assert data.data_format(str(shards / "{00000,00002}.tar")) == ("shards", tars[::2])
    assert data.data_format(tars[1]) == ("shards", tars[1:2])
    assert data.data_format(str(parquet)) == ("parquet", [str(parquet)])
    assert data.data_format(str(tmp_path / "imgs")) == ("folder", [str(tmp_path / "imgs")])
    # img2dataset writes a metadata .parquet beside each .tar: the folder is still a shard set.
    pq.write_table(pa.table({"url": ["x"]}), shards / "00000.parquet")
    assert data.data_format(str(shards))[0] == "shards"
    # A pattern naming a shard that is not there, or nothing, or two formats: one line naming it.
    with pytest.raises(MissingFile, match=r"00004.tar \(of --data .*\) does not exist; fix --data"):
        data.data_format(str(shards / "{00000..00004}.tar"))
    with pytest.raises(MissingFile, match="matches no file"):
        data.data_format(str(shards / "*.tgz"))
    with pytest.raises(UserError, match=r"matches .parquet, .tar files"):
        data.data_format(str(shards / "*"))
    # Shards carry their own captions: a --captions beside them is refused rather than ignored.
    with pytest.raises(UserError, match="carry their own captions"):
        data.open_dataset(str(shards), str(tmp_path / "caps.jsonl"), 16)


def test_img2dataset_json_captions_and_the_key_flags(tmp_path):
    # img2dataset: KEY.jpg + KEY.json {"caption": ...} (+ KEY.txt); --caption-key picks a JSON field
    # or a member, --image-key the image member.
    jpg = io.BytesIO()
    Image.new("RGB", (24, 20), (200, 30, 30)).save(jpg, "JPEG")
    meta = lambda i: json.dumps({"caption": f"red {i}", "alt": f"alt {i}", "url": "http://x"}).encode()
    write_tar(tmp_path / "a.tar", [(f"{i:04d}", {"jpg": jpg.getvalue(), "json": meta(i), "webp": png((0, 0, 9 * i))})
                                   for i in range(3)])
    ds = data.open_dataset(str(tmp_path / "a.tar"), image_size=16, progress=False)
    assert ds.captions == ["red 0", "red 1", "red 2"] and ds.labels is None
    assert ds[0][0].shape == (3, 16, 16) and ds[0][0][0].mean() > 0.4  # the red JPEG, not the PNG
    ds = data.open_dataset(str(tmp_path / "a.tar"), image_size=16, progress=False, caption_key="alt", image_key="webp")
    assert ds.captions == ["alt 0", "alt 1", "alt 2"] and ds[2][0][2].mean() > -0.9  # the blue .webp member
    # Parquet in img2dataset's layout: the image in a binary column "jpg", the caption in "txt".
    pq.write_table(pa.table({"jpg": [jpg.getvalue()] * 2, "txt": ["a", "b"], "other": ["c", "d"]}), tmp_path / "x.parquet")
    assert data.open_dataset(str(tmp_path / "x.parquet"), image_size=16, progress=False).captions == ["a", "b"]
    assert data.open_dataset(str(tmp_path / "x.parquet"), image_size=16, progress=False,
                             caption_key="other").captions == ["c", "d"]
    with pytest.raises(UserError, match=r"x.parquet has no column 'alt' \(columns: jpg, txt, other\); fix --caption-key"):
        data.open_dataset(str(tmp_path / "x.parquet"), image_size=16, caption_key="alt")
    pq.write_table(pa.table({"pixels": [b"x"], "txt": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(UserError, match=r"no image column \(tried image, .*\); pass --image-key COLUMN"):
        data.open_dataset(str(tmp_path / "x.parquet"), image_size=16)


def one_line_naming(err, *parts):
    message = str(err.value)
    assert "\n" not in message and all(p in message for p in parts), message
    return message


def test_bad_shard_members_name_the_shard_and_the_key_or_are_skipped_and_counted(tmp_path):
    good = lambda i: (f"{i:03d}", {"png": png(color(i)), "txt": f"c {i}".encode()})
    cases = {  # what is wrong with sample 001 -> what the line says
        "undecodable": ({"png": b"not an image", "txt": b"c 1"}, "unreadable image"),
        "no caption": ({"png": png((1, 2, 3))}, "an image with no caption (001.txt or a \"caption\" in 001.json)"),
        "empty caption": ({"png": png((1, 2, 3)), "txt": b"  "}, "an image with an empty caption"),
        "no image": ({"txt": b"c 1"}, "a caption but no image (001.jpg/jpeg/png/webp)"),
        "not UTF-8": ({"png": png((1, 2, 3)), "txt": b"caf\xe9"}, "does not read (UnicodeDecodeError"),
    }
    for name, (parts, says) in cases.items():
        shard = tmp_path / f"{name.replace(' ', '-')}.tar"
        write_tar(shard, [good(0), ("001", parts), good(2)])
        with pytest.raises(UserError) as err:
            data.open_dataset(str(shard), image_size=16, progress=False)
        one_line_naming(err, str(shard), "001", says, "--skip-bad", "(1 problem(s) in all")
        ds = data.open_dataset(str(shard), image_size=16, progress=False, skip_bad=True)
        assert ds.captions == ["c 0", "c 2"] and ds.skipped == 1, name
    # The run says it before training starts, in one line, and trains on the rest with --skip-bad.
    os.makedirs(tmp_path / "s")
    write_tar(tmp_path / "s" / "00000.tar",
              [good(i) for i in range(8)] + [("bad", {"png": b"junk", "txt": b"x"})] + [good(i) for i in range(9, 12)])
    run = TINY + ["--data", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4"]
    with pytest.raises(UserError, match=r"00000.tar: bad: unreadable image"):
        train.main(run + ["--out", str(tmp_path / "o1")])
    assert not os.path.exists(tmp_path / "o1" / "log.jsonl")
    train.main(run + ["--out", str(tmp_path / "o2"), "--skip-bad"])
    assert torch.load(tmp_path / "o2" / "ckpt-latest.pt", weights_only=True)["step"] == 1


def test_a_truncated_tar_is_named_and_its_complete_samples_kept_with_skip_bad(tmp_path):
    shard = tmp_path / "00000.tar"
    write_tar(shard, [(f"{i:03d}", {"png": png(color(i)), "txt": f"c {i}".encode()}) for i in range(6)])
    whole = shard.read_bytes()
    # Cut inside sample 004's image, at a member boundary (no end-of-archive block), inside a header.
    for cut in (4 * 2048 + 700, 4 * 2048, 4 * 2048 + 1024 + 100):
        shard.write_bytes(whole[:cut])
        with pytest.raises(UserError) as err:
            data.open_dataset(str(shard), image_size=16, progress=False)
        one_line_naming(err, str(shard), "truncated or damaged after member", "write or download it again")
        ds = data.open_dataset(str(shard), image_size=16, progress=False, skip_bad=True)
        assert ds.captions == ["c 0", "c 1", "c 2", "c 3"], cut  # the samples before the cut, whole
    shard.write_bytes(b"")
    with pytest.raises(UserError, match="00000.tar: not a readable tar"):
        data.open_dataset(str(shard), image_size=16, progress=False)


def test_bad_parquet_rows_name_the_file_and_the_row_or_are_skipped_and_counted(tmp_path):
    path = tmp_path / "d.parquet"
    images = [{"bytes": png(color(i)), "path": None} for i in range(6)]
    captions = [f"c {i}" for i in range(6)]
    cases = {  # what is wrong with row 3 -> what the line says
        "null image": ({"bytes": None, "path": "x.png"}, "c 3", "row 3: null image"),
        "null row": (None, "c 3", "row 3: null image"),
        "undecodable": ({"bytes": b"junk", "path": None}, "c 3", "row 3: unreadable image"),
        "null caption": (images[3], None, "row 3: null caption (column text)"),
        "empty caption": (images[3], "", "row 3: empty caption (column text)"),
    }
    for name, (image, caption, says) in cases.items():
        pq.write_table(pa.table({"image": images[:3] + [image] + images[4:],
                                 "text": captions[:3] + [caption] + captions[4:]}), path, row_group_size=2)
        with pytest.raises(UserError) as err:
            data.open_dataset(str(path), image_size=16, progress=False)
        one_line_naming(err, str(path), says, "--skip-bad", "(1 problem(s) in all")
        ds = data.open_dataset(str(path), image_size=16, progress=False, skip_bad=True)
        assert ds.captions == ["c 0", "c 1", "c 2", "c 4", "c 5"] and ds.skipped == 1, name
        assert torch.equal(ds[3][0], data.to_tensor(data.center_crop(Image.new("RGB", (20, 20), color(4)), 16)))
    path.write_bytes(path.read_bytes()[:100])  # a truncated file
    with pytest.raises(UserError, match=r"d.parquet: not a readable Parquet file .*; fix --data"):
        data.open_dataset(str(path), image_size=16)


def test_parquet_without_pyarrow_says_how_to_get_it(tmp_path, monkeypatch):
    _, _, _, parquet = three_formats(tmp_path, n=4)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import pyarrow.parquet -> ImportError
    with pytest.raises(UserError, match=r"^reading Parquet needs pyarrow: pip install pyarrow$"):
        data.open_dataset(str(parquet), image_size=16)


def test_data_py_shards_converts_a_folder_keeping_images_order_and_split(tmp_path):
    folder, caps, _, _ = three_formats(tmp_path, n=20, labels=True)
    out = tmp_path / "converted"
    paths = data.main(["shards", "--data", str(folder), "--captions", str(caps), "--out", str(out), "--size", "16",
                       "--per-shard", "8", "--format", "png"])
    assert [os.path.basename(p) for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(paths[0]) as tar:
        assert tar.getnames()[:3] == ["00000000.png", "00000000.txt", "00000000.cls"]
    src = data.load_splits(str(folder), str(caps), 16, seed=3, val_images=4, progress=False)
    dst = data.load_splits(str(out), None, 16, seed=3, val_images=4, progress=False)
    for a, b in zip(src, dst):  # the same split, captions, labels and (lossless, already 16 px) pixels
        assert a.captions == b.captions and a.labels == b.labels
        assert all(torch.equal(a[k][0], b[k][0]) for k in range(len(a)))
    with tarfile.open(paths[0]) as tar:
        assert Image.open(tar.extractfile("00000000.png")).size == (16, 16)  # resized once, here


def test_bench_times_the_loader_on_every_format():
    import bench
    results = bench.main(["--only", "loader", "--loader-images", "24", "--loader-source-size", "32", "--image-size", "16",
                          "--loader-workers", "0", "--batch-size", "4"])
    step, loaders = results[0], results[1:]  # the tokenizer step, timed for the comparison, then each format
    assert [r["format"] for r in loaders] == ["builtin, drawn per item", "builtin, drawn once", "folder", "shards",
                                              "parquet"]
    # Timed from the second batch: 24 built-in images are 6 batches, 23 real ones (one held out) 5 whole batches.
    assert [r["images"] for r in loaders] == [20, 20, 16, 16, 16] and all(r["img_per_s"] > 0 for r in loaders)
    assert all(r["step_img_per_s"] == step["img_per_s"] for r in loaders)


@pytest.mark.parametrize("fmt", ["shards", "parquet"])
def test_a_resumed_run_on_shards_or_parquet_continues_where_the_data_stopped(tmp_path, monkeypatch, fmt):
    from conftest import kill_after_checkpoint
    _, _, shards, parquet = three_formats(tmp_path)
    run = TINY[:-2] + ["--steps", "4", "--save-every", "2", "--data", str(shards if fmt == "shards" else parquet),
                       "--cache-dir", str(tmp_path / "cache")]
    train.main(run + ["--out", str(tmp_path / "full")])
    # Killed right after the checkpoint of step 2, then resumed: steps 3-4 read the batches the full run read.
    save = kill_after_checkpoint(monkeypatch, train, 2)
    with pytest.raises(KeyboardInterrupt):
        train.main(run + ["--out", str(tmp_path / "cut")])
    monkeypatch.setattr(train, "save_checkpoint", save)
    train.main(run + ["--out", str(tmp_path / "cut"), "--resume"])
    losses = lambda out: [r["loss"] for r in map(json.loads, open(out / "log.jsonl")) if "loss" in r]
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


def test_two_gloo_ranks_read_disjoint_halves_of_each_shard_batch(tmp_path):
    # The first step's loss, averaged across ranks, is the one process's: each rank read its own half of the
    # global batch (had both read the same half, the mean would be that half's). Compared before any update.
    import subprocess
    _, _, shards, _ = three_formats(tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = TINY + ["--data", str(shards), "--cache-dir", str(tmp_path / "cache")]
    subprocess.run([sys.executable, "train.py", *flags, "--out", str(tmp_path / "one")], cwd=root, env=env,
                   check=True, capture_output=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                          "train.py", *flags, "--out", str(tmp_path / "two")], cwd=root, env=env, capture_output=True,
                         text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert first_loss(tmp_path / "two") == pytest.approx(first_loss(tmp_path / "one"), rel=1e-5)
    # ... and each rank's half is what ShardedSampler gives it: disjoint, together the global batch.
    n = len(data.load_splits(str(shards), image_size=16, val_images=8, progress=False)[0])
    halves = [list(data.ShardedSampler(n, 4, rank, 2, seed=0))[:4] for rank in (0, 1)]
    assert not set(halves[0]) & set(halves[1]) and sorted(halves[0] + halves[1]) == sorted(
        list(data.ShardedSampler(n, 8, 0, 1, seed=0))[:8])
