"""The second round of bad inputs (docs/bad-inputs.md): nothing a user gives is lost or silently
read wrong, and each mistake is one line, before any long work."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import caption
import data
import eval_fid
import files
import reproduce
import sample
import train
from conftest import captioned_folder, kill_after_checkpoint
from files import UserError

TINY = ["--image-size", "16", "--patch-size", "8", "--num-tokens", "1", "--text-len", "16", "--num-images", "16",
        "--val-images", "4", "--batch-size", "4", "--num-workers", "0", "--gan-weight", "0", "--log-every", "1",
        "--eval-every", "1000", "--save-every", "1"]


def one_line_flag_error(capsys, get_args, argv):
    """The stderr of a flag refused at parse time (status 2), checked to be one line."""
    with pytest.raises(SystemExit) as exit:
        get_args(argv)
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and err.splitlines() == [err], err
    return err


def labelled_folder(tmp_path, labels):
    """Flat folder of len(labels) images, captioned with these 'label' values (None: no label)."""
    root, caps = captioned_folder(tmp_path, len(labels), lambda i: (10 * i, 0, 0), lambda i: f"image {i}")
    rows = [json.loads(line) for line in caps.read_text().splitlines()]
    for r, label in zip(rows, labels):
        if label is not None:
            r["label"] = label
    caps.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, caps


def never_decode(monkeypatch):
    """Makes the upfront image check fail the test: what it guards is refused before any image is read."""
    monkeypatch.setattr(data, "image_problem", lambda *a: pytest.fail("an image was decoded before the refusal"))


#################################################################################
#                       Wrong: data lost or silently misread                    #
#################################################################################

def test_exif_orientation_is_applied_when_any_script_loads_an_image(tmp_path):
    # A phone photo stored sideways (left half red, right half blue), tagged "rotate 90 degrees clockwise".
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(arr).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    img = np.asarray(data.load_rgb(str(tmp_path / "phone.jpg")))
    assert img.shape == (20, 10, 3)  # upright: taller than wide
    assert img[2, 5, 0] > 200 and img[2, 5, 2] < 60  # the left side is now the top
    assert img[17, 5, 2] > 200 and img[17, 5, 0] < 60


def test_labels_that_are_numbers_keep_them_and_class_names_are_numbered_in_sorted_order(tmp_path, capsys):
    root, caps = labelled_folder(tmp_path, [str(i) for i in range(12)])
    assert data.CaptionedImages(str(root), str(caps), 8, progress=False).labels == list(range(12))  # "10" is 10
    root, caps = labelled_folder(tmp_path / "names", ["dog", "cat", "dog", "emu", "cat", "emu"])
    d = data.CaptionedImages(str(root), str(caps), 8, progress=False)
    assert d.labels == [1, 0, 1, 2, 0, 2] and d.class_names == ["cat", "dog", "emu"]
    # caption.py --holdout writes the same numbers, which sample.py --class-captions reads as the DiT's classes.
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"file": f"{i}.png", "caption": f"c{i}", "label": ["dog", "cat", "emu"][i % 3]})
                           + "\n" for i in range(30)))
    caption.main(["--holdout", str(big), "--fraction", "0.2"])
    unseen = [json.loads(line) for line in (tmp_path / "big-unseen.jsonl").read_text().splitlines()]
    assert {(r["label"], r["class"]) for r in unseen} == {(0, "cat"), (1, "dog"), (2, "emu")}
    pool = sample.load_class_captions(str(tmp_path / "big-unseen.jsonl"))
    assert all(json.loads(big.read_text().splitlines()[int(c[1:])])["label"] == ["cat", "dog", "emu"][label]
               for label, caps_ in pool.items() for c in caps_)


@pytest.mark.parametrize("labels, says", [
    ([0, 1, -1, 1], "caps.jsonl:3: label -1 is negative"),
    ([0, 1, 100000, 1], "caps.jsonl:3: label 100000 is far beyond the 3 distinct label(s)"),
    ([0, "dog", 1, 1], "caps.jsonl:2: label 'dog' is a class name, but caps.jsonl:1 has the number 0"),
    ([0, 1, None, 1], "caps.jsonl:3: no 'label', but other lines have one (caps.jsonl:1)"),
    ([0, 1.5, 1, 0], "caps.jsonl:2: label 1.5 is neither an int nor a class name"),
])
def test_a_label_no_model_can_use_is_refused_before_any_image_is_read(tmp_path, monkeypatch, labels, says):
    root, caps = labelled_folder(tmp_path, labels)
    never_decode(monkeypatch)
    with pytest.raises(UserError) as e:
        data.CaptionedImages(str(root), str(caps), 8, progress=False)
    message = str(e.value).replace(f"{tmp_path}/", "")
    assert message.startswith(says) and "\n" not in message


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(tmp_path, monkeypatch):
    out = tmp_path / "run"
    os.makedirs(out)
    # A live run: this test's parent process, on this host.
    (out / "run.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    monkeypatch.setattr(train, "load_splits", lambda *a, **k: pytest.fail("work began"))
    with pytest.raises(UserError) as e:
        train.main(TINY + ["--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert f"is in use by another run (pid {os.getppid()} on {socket.gethostname()}" in str(e.value)
    # A lock left by a killed run (its pid is gone) is taken over, and released when the run ends, even by an error.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with pytest.raises(RuntimeError):
        with files.lock_out(str(out)):
            assert json.loads((out / "run.lock").read_text())["pid"] == os.getpid()
            raise RuntimeError("crash mid-run")
    assert not (out / "run.lock").exists()


def test_captions_without_data_are_refused_at_parse_time(capsys):
    for get_args in (train.get_args, reproduce.get_args):
        err = one_line_flag_error(capsys, get_args, ["--captions", "mine.jsonl"])
        assert "--captions mine.jsonl goes with --data FOLDER" in err
    with pytest.raises(UserError, match="--captions mine.jsonl goes with --data FOLDER"):
        eval_fid.held_out_images("no/tokenizer", 16, "builtin", "mine.jsonl")


def test_shorter_builtin_captions_with_a_folder_are_refused_and_scoring_keeps_a_runs_captions(tmp_path, capsys):
    for get_args in (train.get_args, reproduce.get_args):
        err = one_line_flag_error(capsys, get_args, ["--data", str(tmp_path), "--builtin-captions", "shapes"])
        assert f"--builtin-captions shapes shortens the built-in captions; --data {tmp_path} has its own" in err
    # eval_fid.py recon scores a run's held-out images with the captions that run trained with.
    (tmp_path / "args.json").write_text(json.dumps({"data": "builtin", "seed": 0, "builtin_captions": "no-places"}))
    held_out, said = eval_fid.held_out_images(str(tmp_path / "tokenizer"), 16, num_images=5)
    assert held_out.captions == data.ShapesDataset(5, 16, seed=1, detail="no-places").captions and "no-places" in said


def test_dit_latents_are_encoded_again_when_an_image_changes_under_its_name(tmp_path, monkeypatch):
    from textok import TexTok, make_config
    root, caps = labelled_folder(tmp_path, [0, 1] * 4)
    tok = tmp_path / "tok"
    TexTok(make_config("TexTok-T", image_size=16, patch_size=8, num_tokens=1, cond="class", num_classes=2,
                       text_in="none")).save_pretrained(str(tok))
    keys = []

    def spy(run, tok, dataset, text, key_parts, batch_size=64):
        keys.append(files.json_digest(key_parts))
        raise KeyboardInterrupt  # the key is all this test needs
    monkeypatch.setattr(train, "latent_cache", spy)
    argv = ["--stage", "dit", "--tokenizer", str(tok), "--data", str(root), "--captions", str(caps), "--dit-cond",
            "class", "--out", str(tmp_path / "dit"), "--cache-dir", str(tmp_path / "cache"), "--num-workers", "0"]
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    Image.new("RGB", (20, 20), (0, 200, 0)).save(root / "03.png")  # replaced under its own name, same byte count
    os.utime(root / "03.png", ns=(1, 1))
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    assert len(keys) == 2 and keys[0] != keys[1]


def test_outputs_in_a_missing_folder_are_written_and_impossible_ones_refused_before_any_work(tmp_path, capsys):
    files.write_arrays(str(tmp_path / "nodir" / "deeper" / "x.npz"), {"arr_0": np.zeros(2)})
    assert (tmp_path / "nodir" / "deeper" / "x.npz").is_file()
    (tmp_path / "afile").write_text("")
    bad = str(tmp_path / "afile" / "x.npz")
    for get_args, argv, flag in ((sample.get_args, ["--num-samples", "4", "--out", bad], "--out"),
                                 (eval_fid.get_args, ["stats", "imgs", "--out", bad], "--out"),
                                 (eval_fid.get_args, ["gen", "s.npz", "r.npz", "--save-ref-stats", bad], "--save-ref-stats"),
                                 (eval_fid.get_args, ["--json", bad, "adherence", "s.npz"], "--json"),
                                 (caption.get_args, ["imgs", "--out", bad], "--out"),
                                 (train.get_args, ["--out", bad], "--out"),
                                 (reproduce.get_args, ["--results", bad], "--results")):
        err = one_line_flag_error(capsys, get_args, argv)
        assert f"error: {flag} {bad}: {tmp_path / 'afile'} is a file, not a folder" in err


def test_a_complete_last_caption_without_a_newline_is_kept(tmp_path):
    path = tmp_path / "caps.jsonl"
    path.write_text('{"file": "a.png", "caption": "one"}\n{"file": "b.png", "caption": "two"}')  # saved by an editor
    assert [r["file"] for r in caption.read_rows(str(path))] == ["a.png", "b.png"]
    assert path.read_text().endswith('"two"}\n')  # the next append starts its own line
    path.write_text('{"file": "a.png", "caption": "one"}\n{"file": "b.png", "capt')  # cut off by a kill
    assert [r["file"] for r in caption.read_rows(str(path))] == ["a.png"]
    (tmp_path / "out.jsonl.shard-0-of-1").write_text('{"file": "c.png", "caption": "three"}')
    assert caption.merge(str(tmp_path / "out.jsonl"), [str(tmp_path / "out.jsonl.shard-0-of-1")]) == 1


@pytest.mark.parametrize("flags, says", [
    (["--seeds", "0", "0"], "--seeds 0 0: 0 is given twice; list each once"),
    (["--tokens", "1", "2", "1"], "--tokens 1 2 1: 1 is given twice"),
    (["--jobs", "0"], "--jobs 0: must be at least 1"),  # a ZeroDivisionError before
    (["--seeds", "-1"], "--seeds -1: seeds must not be negative"),
])
def test_sweep_flags_that_would_count_a_run_twice_or_crash_are_refused(capsys, flags, says):
    assert says in one_line_flag_error(capsys, reproduce.get_args, flags)


def test_only_the_published_settings_write_the_published_results_by_default():
    published = reproduce.get_args([])
    assert published.results == "docs/results" and published.out == os.path.join("out", "reproduce")
    assert reproduce.get_args(["--steps", "1000", "--seeds", "0", "1", "2"]).results == "docs/results"  # the defaults, spelt out
    smoke = reproduce.get_args(["--steps", "3", "--tokens", "1", "--seeds", "0"])
    assert smoke.results == smoke.out and smoke.out.startswith(os.path.join("out", "reproduce-cpu-"))
    assert reproduce.get_args(["--steps", "3", "--tokens", "1", "--seeds", "0"]).out == smoke.out  # rerun: resumes it
    assert reproduce.get_args(["--steps", "3", "--results", "docs/results"]).results == "docs/results"  # asked for
    # Shorter built-in captions are another sweep: its own folder, its runs told, never the published table.
    short = reproduce.get_args(["--builtin-captions", "no-colors"])
    assert short.results == short.out != published.out and reproduce.sweep_settings(short)["builtin_captions"] == "no-colors"
    argv = reproduce.train_argv(short, reproduce.plan(short)[0], "x")
    assert argv[argv.index("--builtin-captions") + 1] == "no-colors" and train.get_args(argv).builtin_captions == "no-colors"
    assert "builtin_captions" not in reproduce.sweep_settings(published)  # sweeps pinned before the flag still resume


#################################################################################
#                       Messy: one line, before the work                        #
#################################################################################

def test_a_symlinked_class_folder_is_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "b"
    os.makedirs(elsewhere)
    os.makedirs(tmp_path / "imgs" / "a")
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a" / "1.png")
    Image.new("RGB", (8, 8)).save(elsewhere / "2.png")
    os.symlink(elsewhere, tmp_path / "imgs" / "b")
    os.symlink(tmp_path / "imgs", tmp_path / "imgs" / "a" / "loop")  # a link back up: listed once, no endless walk
    (tmp_path / "c.jsonl").write_text('{"file": "a/1.png", "caption": "x"}\n{"file": "b/2.png", "caption": "y"}\n')
    d = data.CaptionedImages(str(tmp_path / "imgs"), str(tmp_path / "c.jsonl"), 8, progress=False)
    assert d.files == ["a/1.png", "b/2.png"] and d.labels == [0, 1]


def test_caption_files_in_the_wrong_shape_say_what_the_format_is(tmp_path, monkeypatch):
    root, caps = captioned_folder(tmp_path, 2, lambda i: (0, 0, 0), lambda i: "x")
    never_decode(monkeypatch)
    caps.write_text(json.dumps([{"file": "00.png", "caption": "x"}, {"file": "01.png", "caption": "x"}], indent=2))
    with pytest.raises(UserError, match=r"caps.jsonl:1: the file is one JSON array over many lines; the format is "
                                        r"JSON lines: one object per line"):
        data.CaptionedImages(str(root), str(caps), 8, progress=False)
    caps.write_text(json.dumps({"file": str(root / "00.png"), "caption": "x"}) + "\n")
    with pytest.raises(UserError, match=rf"caps.jsonl:1: 'file' is an absolute path \({root / '00.png'}\); paths are "
                                        rf"relative to the image folder"):
        data.CaptionedImages(str(root), str(caps), 8, progress=False)


def test_ctrl_c_in_training_is_one_line_with_the_command_that_resumes(tmp_path, monkeypatch, capsys):
    argv = TINY + ["--steps", "4", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    kill_after_checkpoint(monkeypatch, train, 2)
    with pytest.raises(SystemExit) as exit:
        files.run_main(lambda: train.main(argv))
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 130 and "Traceback" not in err  # above it, only the progress bars
    err = err.splitlines()[-1]
    assert err.startswith(f"interrupted: train.py stopped at step 2; {tmp_path / 'run' / 'ckpt-latest.pt'} holds "
                          f"step 2; continue with: python train.py ") and err.endswith(" --resume")
    assert not (tmp_path / "run" / "run.lock").exists()


def test_a_dit_for_a_tokenizer_and_a_tokenizer_for_a_dit_say_which_is_which(tmp_path):
    from dit import DiT, make_dit_config
    from textok import TexTok, make_config
    TexTok(make_config("TexTok-T", image_size=16, patch_size=8, num_tokens=1)).save_pretrained(str(tmp_path / "tok"))
    DiT(make_dit_config("DiT-T", num_tokens=1, token_dim=8)).save_pretrained(str(tmp_path / "dit"), {"data": "builtin"})
    with pytest.raises(UserError, match=f"{tmp_path / 'dit'} is a DiT, not a tokenizer"):
        TexTok.from_pretrained(str(tmp_path / "dit"))
    with pytest.raises(UserError, match=f"{tmp_path / 'tok'} is a tokenizer, not a DiT"):
        DiT.from_pretrained(str(tmp_path / "tok"))


@pytest.mark.parametrize("get_args, argv, says", [
    (sample.get_args, ["--num-samples", "-5"], "--num-samples -5: must not be negative"),  # a file-extension message before
    (sample.get_args, ["--prompts-file", "no-such.txt"], "--prompts-file no-such.txt: no such file"),
    (train.get_args, ["--seed", "-1"], "--seed -1: must not be negative"),
    (train.get_args, ["--text-noise", "-0.5"], "--text-noise -0.5: must not be negative"),
    (caption.get_args, ["imgs", "--shard", "abc"], "--shard abc: expected i/n with 0 <= i < n"),  # int()'s traceback
    (caption.get_args, ["imgs", "--shard", "2/2"], "--shard 2/2: expected i/n with 0 <= i < n"),
])
def test_more_flags_that_were_tracebacks(capsys, get_args, argv, says):
    assert says in one_line_flag_error(capsys, get_args, argv)


def test_eval_inputs_are_checked_before_the_inception_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_fid, "load_inception", lambda args: pytest.fail("the Inception was loaded"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", arr_0=rng.integers(0, 255, (8, 8, 8, 3), dtype=np.uint8))
    os.makedirs(tmp_path / "ref")
    for i in range(6):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "ref" / f"{i}.png")
    (tmp_path / "ref" / "5.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"ref/5.png: unreadable image .*; remove it from the folder"):
        eval_fid.main(["gen", str(tmp_path / "s.npz"), str(tmp_path / "ref")])
    np.savez(tmp_path / "narrow.npz", mu=np.zeros(64), sigma=np.eye(64))  # another network's statistics
    with pytest.raises(UserError, match=r"narrow.npz: mu has shape \(64,\), but the Inception's pool features give "
                                        r"\(2048,\)"):
        eval_fid.main(["gen", str(tmp_path / "s.npz"), str(tmp_path / "narrow.npz")])


def test_a_sweep_says_which_run_failed_and_a_report_of_nothing_pins_no_settings(tmp_path, monkeypatch, capsys):
    flags = ["--tokens", "1", "--seeds", "0", "--ablation-tokens", "0", "--steps", "2", "--jobs", "1",
             "--out", str(tmp_path / "sweep"), "--results", str(tmp_path / "res")]
    reproduce.main(flags + ["--report"])
    assert not (tmp_path / "sweep" / "sweep.json").exists()  # it refused the next real sweep before

    def damaged(argv):
        raise UserError("ckpt-latest.pt is truncated; nothing to resume: drop --resume")
    monkeypatch.setattr(train, "main", damaged)
    threads = torch.get_num_threads()  # run_one sets the runs' share of the cores
    with pytest.raises(UserError) as e:
        reproduce.main(flags)
    torch.set_num_threads(threads)
    run = tmp_path / "sweep" / "n1-both-s0"
    assert (f"run n1-both-s0 failed: ckpt-latest.pt is truncated; nothing to resume: drop --resume  (its log: "
            f"{run / 'run.log'}; to redo the run, delete {run} and run the sweep again)") in str(e.value)
    assert "2 run(s) failed" in str(e.value)  # the other run was still tried
    # train.py's own flag checks reach the terminal, not the first run's log.
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        reproduce.main(flags + ["--train-flags", "--lr -1"])
    assert "--lr -1.0: must be positive" in capsys.readouterr().err


def test_resume_of_a_damaged_checkpoint_is_refused_before_any_caption_is_embedded(tmp_path, monkeypatch):
    out = tmp_path / "run"
    os.makedirs(out)
    (out / "ckpt-latest.pt").write_bytes(b"")
    monkeypatch.setattr(train, "load_splits", lambda *a, **k: pytest.fail("work began"))
    with pytest.raises(UserError, match="ckpt-latest.pt is empty"):
        train.main(TINY + ["--out", str(out), "--resume"])
    torch.save({"step": 9, "args": {"stage": "dit"}, "config": {}, "rng_cpu": torch.zeros(1),
                "rng_cuda": torch.zeros(0)}, out / "ckpt-latest.pt")
    with pytest.raises(UserError, match="is a --stage dit checkpoint"):
        train.main(TINY + ["--out", str(out), "--resume"])
