"""What train.py promises: DDP takes the same step as one process, exact resume, checkpoints that
survive a crash mid-write, and clear errors for bad input."""
import errno
import json
import os
import re

import pytest
import torch

import train
from conftest import assert_same_gradients, captioned_folder, first_gradients, kill_after_checkpoint
from files import DiskFull, UserError
from textok import TexTok

# A run small enough for a CPU test: 16 px shapes, a 2+2-layer TexTok, every loss switched on.
TINY = ["--image-size", "16", "--patch-size", "4", "--num-tokens", "8", "--text-len", "32",
        "--num-images", "64", "--val-images", "8", "--batch-size", "8", "--num-workers", "0", "--lpips-weight", "0.1",
        "--disc-start", "2", "--disc-channel-base", "128", "--disc-channel-max", "16",
        "--warmup-steps", "2", "--log-every", "1", "--eval-every", "1000", "--save-every", "1000"]


def tiny_args(out, cache, *extra):
    return TINY + ["--out", str(out), "--cache-dir", str(cache), *extra]


def load(out):
    return torch.load(os.path.join(out, "ckpt-latest.pt"), map_location="cpu", weights_only=True)


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def test_ddp_two_processes_take_the_same_step_as_one(tmp_path):
    # What DDP promises: the gradient two gloo ranks all-reduce, each from half the global batch, is the
    # one one process computes on all of it, for TexTok's step and the discriminator's (--disc-start 0).
    # Gradients are compared, not weights after a few Adam steps: Adam's first steps move every weight by
    # about lr whatever its gradient, so a rounding-level gradient summed in another order (2 ranks) can
    # step the other way (1.7e-4 apart after 3 steps on an AMD EPYC).
    cache, first = tmp_path / "cache", ["--disc-start", "0", "--steps", "1"]
    one, losses_one = first_gradients(tmp_path / "one", cache, *TINY, *first)
    two, losses_two = first_gradients(tmp_path / "two", cache, *TINY, *first, ranks=2, port=29517)
    assert len(one) == 2  # TexTok's step and the discriminator's
    assert_same_gradients(one, two)
    # ... and the logged losses (averaged across ranks) match the single process's.
    for ra, rb in zip(losses_one, losses_two):
        assert ra["l2"] == pytest.approx(rb["l2"], rel=1e-4) and ra["d"] == pytest.approx(rb["d"], rel=1e-4, abs=1e-6)


def test_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    full = tmp_path / "full"
    train.main(tiny_args(full, cache, "--steps", "6", "--save-every", "3"))

    # The same run, killed right after its step-3 checkpoint ...
    save = kill_after_checkpoint(monkeypatch, train, 3)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny_args(cut, cache, "--steps", "6", "--save-every", "3"))
    monkeypatch.setattr(train, "save_checkpoint", save)
    ckpt = load(cut)  # loads with weights_only=True and holds what a resumed run needs, nothing else:
    # the step fixes the data position, the learning rate and every per-step draw
    assert ckpt["step"] == 3
    assert set(ckpt) == {"step", "rng_cpu", "rng_cuda", "args", "config", "model", "ema", "opt", "disc", "lecam", "opt_d"}
    # ... and resumed: the following losses and the final weights match the uninterrupted run.
    train.main(tiny_args(cut, cache, "--steps", "6", "--save-every", "3", "--resume"))
    assert [r["step"] for r in losses(cut)] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(losses(full)[3:], losses(cut)[3:]):
        for k in ("loss", "l2", "lpips", "g_adv", "d", "lecam"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["step"], k)
    a, b = load(full), load(cut)
    for part in ("model", "ema", "disc"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], msg=f"{part}.{k}")
    # The run leaves a loadable tokenizer (EMA weights) and a reconstruction grid.
    tok = TexTok.from_pretrained(str(cut / "tokenizer"))
    assert tok.cfg.num_tokens == 8 and tok.cfg.text_encoder == "minilm"
    assert (cut / "recon-0000006.png").exists()


def test_resuming_a_checkpoint_older_than_a_flag_says_which_flag_it_now_trains_with(tmp_path, capsys):
    # A run saved before a flag existed trained with that flag's earlier behaviour; resumed today it gets
    # the flag's default, which the resume must say (a default that differs would change the training).
    cache, out = tmp_path / "cache", tmp_path / "old"
    train.main(tiny_args(out, cache, "--steps", "1"))
    ckpt = torch.load(out / "ckpt-latest.pt", weights_only=True)
    del ckpt["args"]["text_noise"]
    torch.save(ckpt, out / "ckpt-latest.pt")
    capsys.readouterr()
    train.main(tiny_args(out, cache, "--steps", "2", "--resume"))
    said = capsys.readouterr().out
    assert "predates these flags" in said and "'text_noise': 0.0" in said
    # Resumed past --disc-start (2 in TINY) by a longer --steps: the discriminator the first run never
    # built starts fresh there (it was a KeyError), and the flag is recorded now: nothing more to say.
    train.main(tiny_args(out, cache, "--steps", "3", "--resume"))
    assert "predates" not in capsys.readouterr().out and "disc" in load(out)


def test_a_full_disk_mid_save_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt-latest.pt")
    train.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def disk_full(obj, f, *a, **k):
        (open(f, "wb") if isinstance(f, str) else f).write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(DiskFull, match=f"no space left.*{re.escape(path)}"):
        train.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt-latest.pt"]
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))


def test_a_checkpoint_is_flushed_to_the_disk_before_it_replaces_the_previous_one(tmp_path, monkeypatch):
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_size)), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", b)), replace(a, b))[1])
    path = str(tmp_path / "ckpt-latest.pt")
    train.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    assert [e[0] for e in events] == ["fsync", "replace"] and events[1][1] == path
    assert events[0][1] == os.path.getsize(path)  # the whole file was synced, not a part


def test_bad_inputs_on_the_command_line(tmp_path):
    with pytest.raises(ValueError, match="--captions"):
        train.main(["--data", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="--data"):
        train.main(["--data", str(tmp_path / "missing"), "--captions", "c.jsonl", "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train.main(tiny_args(tmp_path / "fresh", tmp_path / "cache", "--resume"))


def test_folder_data_keeps_each_image_with_its_own_caption(tmp_path):
    # 12 flat-coloured images, each captioned with its own colour value. After the train /
    # held-out split, item k of a split must return index k (the row of the caption caches built
    # from split.captions) and the image that caption describes.
    root, caps = captioned_folder(tmp_path, 12, lambda i: (20 * i, 0, 0), lambda i: f"red level {20 * i}")
    args = train.get_args(["--data", str(root), "--captions", str(caps), "--val-images", "2"])
    train_set, val_set, _ = train.build_data(args, 16, master=False)
    assert len(train_set) == 11 and len(val_set) == 1  # at most a tenth is held out
    for split in (train_set, val_set):
        for k in range(len(split)):
            image, index, _ = split[k]
            red = round((image[0, 0, 0].item() + 1) * 127.5)
            assert index == k and split.captions[k] == f"red level {red}"
    # ... and a run on it trains (caption rows looked up by those indices).
    train.main(tiny_args(tmp_path / "out", tmp_path / "cache", "--data", str(root), "--captions", str(caps),
                         "--steps", "2", "--batch-size", "4"))
    assert load(tmp_path / "out")["step"] == 2


def test_every_evaluation_measures_how_much_the_caption_is_used(tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(out, tmp_path / "cache", "--steps", "2", "--eval-every", "2", "--disc-start", "100"))
    with open(out / "log.jsonl") as f:
        ev = [r for r in map(json.loads, f) if "eval" in r][-1]["eval"]
    # PSNR with each image's own caption, the next image's and an empty one: three different numbers
    assert len({round(ev[k], 6) for k in ("psnr", "psnr_other", "psnr_empty")}) == 3
    # attention to the caption, per layer of each ViT (TexTok-T: 4 + 4), as shares
    assert [len(ev["text_attention"][k]) for k in ("tokenizer", "detokenizer")] == [4, 4]
    assert all(0 < a < 1 for k in ev["text_attention"] for a in ev["text_attention"][k])
    # the grid: input, recon, next row's caption, empty caption, error; the row captions beside it
    from PIL import Image
    grid = Image.open(out / "recon-0000002.png")
    assert grid.width == 5 * 160  # five 16 px columns at x10
    assert (out / "recon-0000002.txt").read_text().startswith("row 0: a ")
    assert (out / "curves.png").is_file()
    # --disc-start past --steps: the GAN never starts, so no discriminator is built or saved.
    assert not {"disc", "lecam", "opt_d"} & set(load(out))
    # The no-text baseline has no caption to change: only its own PSNR.
    train.main(tiny_args(tmp_path / "base", tmp_path / "cache", "--steps", "2", "--eval-every", "2", "--text-in", "none"))
    with open(tmp_path / "base" / "log.jsonl") as f:
        assert set([r for r in map(json.loads, f) if "eval" in r][-1]["eval"]) == {"psnr", "ssim", "train_psnr"}


def test_every_evaluation_also_scores_the_caption_on_training_images(tmp_path, capsys):
    # Issue 24: a caption that helps on training images and not on held-out ones is recognised, not
    # read. The evaluation says which by scoring both, and eval_fid.py recon --train-images agrees.
    import eval_fid
    root, caps = captioned_folder(tmp_path, 40, lambda i: (6 * i, 250 - 6 * i, 40 * (i % 3)),
                                  lambda i: f"a {('red', 'green', 'blue')[i % 3]} square number {i}")
    out = tmp_path / "run"
    train.main(["--data", str(root), "--captions", str(caps), "--image-size", "16", "--patch-size", "4",
                "--num-tokens", "1", "--text-len", "16", "--batch-size", "4", "--steps", "2", "--val-images", "4",
                "--num-workers", "0", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    with open(out / "log.jsonl") as f:
        ev = [r for r in map(json.loads, f) if "eval" in r][-1]["eval"]
    assert {"train_psnr", "train_psnr_other", "train_psnr_empty"} <= set(ev)
    # ... and prints the caption's worth on both side by side, the numbers a user compares
    worth = (f"held-out {ev['psnr'] - ev['psnr_other']:.2f} dB, "
             f"training images {ev['train_psnr'] - ev['train_psnr_other']:.2f} dB")
    assert f"the caption's worth (own - another's): {worth}" in capsys.readouterr().out
    res = eval_fid.main(["--batch-size", "4", "recon", "--tokenizer", str(out / "tokenizer"), "--no-lpips",
                         "--train-images", "4", "--other-captions", "--empty-captions"])
    seen = res["training images"]
    assert seen["num_images"] == 4 and "of the 36 images the tokenizer trained on" in seen["images"]
    # The same 4 training images (spread over the split) and captions: the cache is fp16, the recon fresh.
    for key, name in (("train_psnr", "captions"), ("train_psnr_other", "other captions"),
                      ("train_psnr_empty", "empty captions")):
        assert seen[name]["psnr"] == pytest.approx(ev[key], abs=0.05)
    assert res["captions"]["psnr"] == pytest.approx(ev["psnr"], abs=0.05)  # and held-out beside it


def test_text_drop_and_noise_at_zero_are_the_plain_run_and_drop_one_trains_without_captions(tmp_path):
    # Two caption files for the same 20 images that differ on every training image (the held-out ones,
    # whose cache holds the empty caption, are the same), with captions of the same token lengths.
    root, caps = captioned_folder(tmp_path, 20, lambda i: (12 * i, 60, 200 - 8 * i), lambda i: f"a red square {i}")
    flags = ["--data", str(root), "--image-size", "16", "--patch-size", "4", "--num-tokens", "2", "--text-len", "16",
             "--batch-size", "4", "--steps", "3", "--val-images", "2", "--num-workers", "0", "--eval-every", "1000",
             "--cache-dir", str(tmp_path / "cache")]
    _, val_set, _ = train.build_data(train.get_args(flags + ["--captions", str(caps)]), 16, master=False)
    held_out = {val_set.dataset.files[i] for i in val_set.indices}
    lines = [json.loads(line) for line in caps.read_text().splitlines()]
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**r, "caption": r["caption"] if r["file"] in held_out else
                                         r["caption"].replace("red square", "blue circle")}) + "\n" for r in lines))

    def weights(name, captions, *extra):
        train.main(flags + ["--captions", str(captions), "--out", str(tmp_path / name), *extra])
        return load(tmp_path / name)["model"]

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    # At 1.0 every training image gets the empty caption: what the captions say never reaches the weights.
    assert same(weights("drop-a", caps, "--text-drop", "1"), weights("drop-b", other, "--text-drop", "1"))
    plain = weights("plain", caps)
    assert not same(plain, weights("plain-other", other))  # ... as it does without dropout
    # At 0 it is the plain run, bit for bit (its draw comes after every other draw of the step).
    assert same(plain, weights("zero", caps, "--text-drop", "0"))
    assert not same(plain, weights("half", caps, "--text-drop", "0.5"))
    # --text-noise the same way: 0 is the plain run bit for bit (3 steps of 4 show each of the 18 training
    # captions under once: the default is 0), noise changes what the captions teach, and a model that
    # reads no caption has nothing for it to touch.
    assert same(plain, weights("noise-0", caps, "--text-noise", "0"))
    assert not same(plain, weights("noise-1", caps, "--text-noise", "1"))
    assert same(weights("none-a", caps, "--text-in", "none"), weights("none-b", caps, "--text-in", "none",
                                                                        "--text-noise", "1"))


def test_text_noise_is_on_by_default_where_each_caption_is_seen_often_and_the_run_records_it(tmp_path, capsys):
    # Issue 24: past MEMORISED_PASSES passes over each caption the detokenizer learns captions by heart,
    # so the default adds noise there and not below; what was chosen goes to args.json (and a resume).
    assert train.default_text_noise(train.MEMORISED_PASSES) == 0.0
    assert train.default_text_noise(train.MEMORISED_PASSES + 0.1) == 1.0
    root, caps = captioned_folder(tmp_path, 10, lambda i: (20 * i, 90, 30), lambda i: f"green {i}")
    flags = ["--data", str(root), "--captions", str(caps), "--image-size", "16", "--patch-size", "4",
             "--num-tokens", "1", "--text-len", "8", "--val-images", "1", "--num-workers", "0",
             "--eval-every", "1000", "--cache-dir", str(tmp_path / "cache")]
    for name, steps, batch, noise in (("few", 3, 4, 0.0), ("many", 14, 8, 1.0), ("given", 14, 8, 0.5)):
        extra = ["--text-noise", "0.5"] if name == "given" else []
        train.main(flags + ["--steps", str(steps), "--batch-size", str(batch), "--out", str(tmp_path / name), *extra])
        with open(tmp_path / name / "args.json") as f:
            assert json.load(f)["text_noise"] == noise  # 12 / 9 images: 1.3 passes; 112 / 9: 12.4
        said = capsys.readouterr().out
        assert ("the default: this run shows each training caption" in said) == (name != "given")


def test_a_run_is_never_replaced_silently_and_logs_each_step_once(tmp_path, monkeypatch):
    cheap = ["--lpips-weight", "0", "--gan-weight", "0", "--steps", "4", "--save-every", "2"]
    out = tmp_path / "run"
    # Killed right after step 3 (its --keep-every copy), one step past ckpt-latest (step 2) ...
    save = kill_after_checkpoint(monkeypatch, train, 3)
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny_args(out, tmp_path / "cache", *cheap, "--keep-every", "3"))
    monkeypatch.setattr(train, "save_checkpoint", save)
    # ... and resumed from step 2: step 3 is replayed, and logged once.
    train.main(tiny_args(out, tmp_path / "cache", *cheap, "--resume"))
    assert [r["step"] for r in losses(out)] == [1, 2, 3, 4]
    assert not {"disc", "lecam", "opt_d"} & set(load(out))  # --gan-weight 0: no discriminator to build or save
    # A fresh run into the finished run's --out is refused, and changes nothing there ...
    with pytest.raises(UserError, match=r"already holds a run.*--resume.*--overwrite"):
        train.main(tiny_args(out, tmp_path / "cache", *cheap))
    assert load(out)["step"] == 4 and len(losses(out)) == 4
    # ... unless told to start over: a new log, not appended to the old one.
    train.main(tiny_args(out, tmp_path / "cache", *cheap[:-4], "--steps", "2", "--overwrite"))
    assert load(out)["step"] == 2 and [r["step"] for r in losses(out)] == [1, 2]


def test_resume_says_in_one_line_why_a_checkpoint_cannot_be_used(tmp_path):
    import argparse
    import sample
    cheap = ["--lpips-weight", "0", "--gan-weight", "0", "--steps", "1"]
    out = tmp_path / "run"
    train.main(tiny_args(out, tmp_path / "cache", *cheap))
    ckpt = out / "ckpt-latest.pt"
    good = ckpt.read_bytes()

    def resume(*flags):
        with pytest.raises(UserError) as err:
            train.main(tiny_args(out, tmp_path / "cache", *cheap, "--steps", "2", "--resume", *flags))
        assert "\n" not in str(err.value) and str(ckpt) in str(err.value)
        return str(err.value)
    # A checkpoint of another model: the flags that differ, not a size mismatch per tensor.
    assert "num_tokens=8" in resume("--num-tokens", "4") and "num_tokens=4" in resume("--num-tokens", "4")
    assert "width=128" in resume("--model", "TexTok-M") and "width=256" in resume("--model", "TexTok-M")
    # A damaged file says so, whatever the damage.
    ckpt.write_bytes(good[: len(good) // 2])
    assert "truncated" in resume()
    ckpt.write_bytes(b"")
    assert "empty" in resume()
    # A pickle of Python objects is never loaded, and the message never suggests loading it anyway.
    torch.save({"args": argparse.Namespace(steps=1), "model": {}}, ckpt)
    message = resume()
    assert "not a checkpoint of this project" in message and "weights_only" not in message
    # sample.py reads DiT checkpoints through the same loader.
    with pytest.raises(UserError, match="not a checkpoint of this project"):
        sample.main(["--dit", str(ckpt)])
    ckpt.write_bytes(good)
    with pytest.raises(UserError, match="not a DiT checkpoint"):
        sample.main(["--dit", str(ckpt)])


@pytest.mark.parametrize("flags, says", [
    (["--num-tokens", "0"], "--num-tokens 0: must be at least 1"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--steps", "0"], "--steps 0: must be at least 1"),  # it printed paths it never wrote
    (["--val-images", "0"], "--val-images 0: must be at least 1"),  # the first evaluation crashed
    (["--lr", "-0.001"], "--lr -0.001: must be positive"),
    (["--beta2", "1"], "--beta2 1.0: must be in [0, 1)"),
    (["--min-lr", "0.1"], "--min-lr 0.1 is above --lr 0.001"),
    (["--image-size", "30"], "--image-size 30 is not a multiple of --patch-size 8"),
    (["--image-size", "24", "--disc-start", "500"], "--image-size 24: the discriminator needs a power of two"),
    (["--resume", "--overwrite"], "--resume continues the run in --out, --overwrite starts it over"),
])
def test_flags_no_run_can_use_are_refused_before_any_work(flags, says, capsys):
    with pytest.raises(SystemExit) as exit:
        train.get_args(flags)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1 and f"error: {says}" in err


def test_an_image_size_that_is_no_power_of_two_is_accepted_when_no_discriminator_is_built():
    # The discriminator needs a power of two; a run that never reaches --disc-start builds none.
    assert train.get_args(["--image-size", "24"]).image_size == 24  # --disc-start 20000 > --steps 1000
    assert train.get_args(["--image-size", "24", "--disc-start", "500", "--gan-weight", "0"]).image_size == 24


def test_a_folder_of_three_images_holds_one_out_and_reaches_a_checkpoint(tmp_path):
    root, caps = captioned_folder(tmp_path, 3, lambda i: (80 * i, 40, 200), lambda i: f"blue {i}")
    out = tmp_path / "out"
    train.main(tiny_args(out, tmp_path / "cache", "--data", str(root), "--captions", str(caps),
                         "--batch-size", "2", "--steps", "2", "--eval-every", "1", "--lpips-weight", "0"))
    with open(out / "log.jsonl") as f:
        evals = [r["eval"] for r in map(json.loads, f) if "eval" in r]
    assert len(evals) == 2 and all(e["psnr"] > 0 for e in evals)  # one held-out image, evaluated each step
    assert load(out)["step"] == 2 and (out / "tokenizer" / "model.safetensors").is_file()
    # eval_fid.py scores that one image too: PSNR and SSIM, without the rFID that needs two.
    import eval_fid
    res = eval_fid.main(["recon", "--tokenizer", str(out / "tokenizer"), "--no-lpips"])
    assert res["num_images"] == 1 and res["captions"]["psnr"] > 0 and "rfid" not in res["captions"]
