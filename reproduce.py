"""
Does the caption let fewer tokens reconstruct better? The paper's central result, repeated at
small scale with seeds and error bars (TexTok Table 1: TexTok against the no-text baseline at
several token counts; Table 4d: where the text enters).

    python reproduce.py                                    # built-in shapes, the default sweep, CPU
    python reproduce.py --data DIR --captions FILE.jsonl   # any captioned image folder
    python reproduce.py --preset gpu                       # larger images, model and budget
    python reproduce.py --report                           # redraw table and figures from finished runs

Every run is `train.py` with the sweep's shared flags and its own --num-tokens, --text-in and
--seed; then eval_fid.py's reconstruction metrics on that run's held-out images (PSNR, SSIM,
LPIPS, rFID with each image's own caption) and two caption tests (PSNR with the next image's
caption, and with an empty one). Runs are independent processes, `--jobs` at a time (on a CPU,
two single-thread runs are faster than one run on two threads). A finished run leaves
<out>/<run>/result.json and is never redone; a killed sweep, run again with the same command,
resumes each unfinished run from its last checkpoint. The summary goes to --results:
table1.json (the command and every run), table1.md, table1.png (metrics against token count,
mean and standard deviation over seeds) and fig1.png (inputs, baseline and TexTok reconstructions
per token count, as the paper's Fig. 1).
"""
import argparse
import contextlib
import json
import math
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
import torch

from data import CAPTION_DETAILS
from files import UserError, check_output, check_ranges, flag_error, json_digest, run_main, write_json, write_text

VARIANTS = ("none", "tokenizer", "detokenizer", "both")  # Table 4d's rows, in its order
# What every run reports on its held-out images: the rFID of Table 1, and the pixel metrics beside it.
METRICS = ("psnr", "ssim", "lpips", "rfid")

# Shared training flags of each preset. Token counts span the paper's Table 1 range by pixel values
# per latent number: its 32-256 tokens of 8 channels at 256 px are 768 down to 96 values per number,
# which at 32 px is 0.5 to 4 tokens (the cpu preset's 1-4 are its 64-256) and at 64 px 2 to 16.
# "cpu" is `python train.py`'s default recipe at each count (the README's numbers); see the
# budget in docs/results.md.
PRESETS = {
    "cpu": dict(model="TexTok-T", image_size=32, patch_size=8, tokens=[1, 2, 3, 4], ablation_tokens=1,
                steps=1000, batch_size=32, lpips_weight=0.0, eval_images=256, num_images=4096),
    "gpu": dict(model="TexTok-S", image_size=64, patch_size=8, tokens=[2, 4, 8, 16], ablation_tokens=4,
                steps=20000, batch_size=64, lpips_weight=0.1, eval_images=1000, num_images=50000),
}
# The generation sweep (--generation, Table 1's gFID and Table 3): a DiT on the tokens of each tokenizer
# run at three of the counts (every seed, TexTok and baseline), and a class-conditional DiT at one count.
# "cpu": train.py --stage dit's default DiT-T, two thirds of its default 3,000 steps (its samples' prompt
# adherence stops rising by 1,000: docs/generation.md), so the DiTs add about an hour to the tokenizers.
GEN_PRESETS = {
    "cpu": dict(gen_tokens=[1, 2, 4], dit_model="DiT-T", dit_steps=2000, dit_batch_size=64, class_tokens=1),
    "gpu": dict(gen_tokens=[2, 4, 16], dit_model="DiT-B", dit_steps=50000, dit_batch_size=256, class_tokens=4),
}


def get_args(argv=None):
    """The sweep's flags; the preset fills in every one not given, and the folders follow --data."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what is compared: token counts and seeds (Table 1), and where the text enters (Table 4d)
    p.add_argument("--preset", default="cpu", choices=list(PRESETS), help="shared sizes and budget (flags below override)")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts N to compare at")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed per setting")
    p.add_argument("--ablation-tokens", type=int, default=None,
                   help="token count of the Table 4d ablation (text in tokenizer only, detokenizer only); 0: skip")
    # the budget and sizes every run shares (default: the preset's)
    p.add_argument("--steps", type=int, default=None, help="training steps of every run (the same budget for all)")
    p.add_argument("--model", default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lpips-weight", type=float, default=None)
    p.add_argument("--num-images", type=int, default=None, help="built-in training images per run")
    p.add_argument("--eval-images", type=int, default=None, help="held-out images scored per run")
    # the data, and how the sweep runs and where it writes
    p.add_argument("--data", default="builtin", help="'builtin' or an image folder")
    p.add_argument("--captions", default=None, help="JSON-lines caption file for --data FOLDER")
    p.add_argument("--builtin-captions", default="full", choices=CAPTION_DETAILS, help="how much the built-in "
                   "captions say (train.py --builtin-captions): what the caption's worth depends on")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad images/captions")
    p.add_argument("--train-flags", default="", help="more train.py flags for every run, e.g. \"--lr 5e-4\"")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (default: 2 on a CPU with 2+ cores, 1 on a GPU)")
    p.add_argument("--out", default=None, help="run folders (default out/reproduce for the published settings, "
                   "else out/reproduce-<folder name> or out/reproduce-<preset>-<hash of the settings>)")
    p.add_argument("--results", default=None, help="where the summary goes (default docs/results, and the README's "
                   "table, for the published settings: the cpu preset's defaults on the built-in data; else <out>)")
    p.add_argument("--cache-dir", default="cache", help="caption-embedding cache shared by the runs")
    p.add_argument("--report", action="store_true", help="only summarise the runs that have finished")
    # the generation sweep: a DiT on each tokenizer's tokens (trains the tokenizers it needs first)
    p.add_argument("--generation", action="store_true", help="the generation sweep (Table 1's gFID, Table 3) "
                   "instead of the reconstruction one: writes generation.json/.md/.png and fig5.png")
    p.add_argument("--dit-model", default=None, help="the DiT of every generation run")
    p.add_argument("--dit-steps", type=int, default=None, help="training steps of every DiT")
    p.add_argument("--dit-batch-size", type=int, default=None)
    p.add_argument("--class-tokens", type=int, default=None, help="token count of the class-conditional DiTs "
                   "(built-in data only; 0: none)")
    args = p.parse_args(argv)
    published = published_settings(args)
    # The generation sweep trains the reconstruction sweep's tokenizers (the same runs, by name and flags) at its
    # own token counts: with the published tokenizer settings it shares their folder, and reuses finished runs.
    shared = published_settings(args, tokenizers_only=True) if args.generation else published
    if args.generation:
        class_given = args.class_tokens is not None
        published = shared and args.tokens is None and args.seeds == [0, 1, 2] and all(
            getattr(args, k) in (None, v) for k, v in GEN_PRESETS["cpu"].items() if k != "gen_tokens")
        args.tokens = args.tokens or GEN_PRESETS[args.preset]["gen_tokens"]
        args.ablation_tokens = 0  # where the text enters is a reconstruction question
        for k, v in GEN_PRESETS[args.preset].items():
            if k != "gen_tokens" and getattr(args, k) is None:
                setattr(args, k, v)
        if args.data != "builtin" and not class_given:
            args.class_tokens = 0  # a folder's classes have no unseen captions to decode with (see plan_generation)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    # Another dataset's sweep gets its own folder: it never resumes, or averages with, the built-in one's runs.
    # The published numbers (docs/results, the README's table) come from the cpu preset's defaults alone: a
    # sweep of other settings (a smoke test) writes to a folder named after them unless --results says otherwise.
    name = "reproduce" if args.data == "builtin" else f"reproduce-{os.path.basename(os.path.normpath(args.data))}"
    if args.data == "builtin" and not shared:
        digest = json_digest([sweep_settings(args), args.tokens, args.seeds, args.ablation_tokens])
        name = f"reproduce-{args.preset}-{digest[:8]}"
    args.out = args.out or os.path.join("out", name)
    args.results = args.results or ("docs/results" if args.data == "builtin" and published else args.out)
    # On a CPU two single-thread runs finish sooner than one run on two threads; a GPU takes one at a time.
    if args.jobs is None:
        args.jobs = 1 if torch.cuda.is_available() else max(1, min(2, os.cpu_count() or 1))
    check_ranges(p, args, at_least_1=("jobs", "steps", "image_size", "patch_size", "batch_size", "num_images",
                                      "eval_images"), not_negative=("ablation_tokens", "lpips_weight"))
    for name in ("tokens", "seeds"):
        values = getattr(args, name)
        shown = f"--{name} {' '.join(map(str, values))}"
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:  # one run per value: a repeat would be trained twice and averaged as if it were another
            flag_error(p, f"{shown}: {twice[0]} is given twice; list each once")
        if min(values) < (1 if name == "tokens" else 0):
            flag_error(p, f"{shown}: " + ("token counts must be at least 1" if name == "tokens" else
                                          "seeds must not be negative"))
    if args.generation:
        check_ranges(p, args, at_least_1=("dit_steps", "dit_batch_size"), not_negative=("class_tokens",))
        if args.class_tokens and args.class_tokens not in args.tokens:
            flag_error(p, f"--class-tokens {args.class_tokens} must be one of --tokens {' '.join(map(str, args.tokens))}"
                          f" (the class DiT reuses that count's tokenizers); or 0 for none")
        if args.class_tokens and args.data != "builtin":
            flag_error(p, f"--class-tokens {args.class_tokens}: class-conditional generation runs on the built-in "
                          f"data only (its unseen captions per class come from a scene seed no run trains on); pass 0")
    if args.captions and args.data == "builtin":  # it would sweep the built-in shapes, the file unread
        flag_error(p, f"--captions {args.captions} goes with --data FOLDER, the images it captions; pass --data")
    if args.builtin_captions != "full" and args.data != "builtin":
        flag_error(p, f"--builtin-captions {args.builtin_captions} shortens the built-in captions; --data {args.data} "
                      f"has its own: drop --builtin-captions")
    # Checked once here, not found missing by every run of the sweep in turn.
    if args.data != "builtin" and not os.path.isdir(args.data):
        flag_error(p, f"--data {args.data}: no such image folder; fix --data")
    if args.captions and not os.path.isfile(args.captions):
        flag_error(p, f"--captions {args.captions}: no such caption file; fix --captions")
    check_output(p, "--out", args.out, folder=True)
    check_output(p, "--results", args.results, folder=True)  # written at the very end of the sweep
    # The ablation is read beside TexTok and the baseline at the same count, so that count must be swept.
    if args.ablation_tokens and args.ablation_tokens not in args.tokens:
        raise UserError(f"--ablation-tokens {args.ablation_tokens} must be one of --tokens {args.tokens}")
    return args


def published_settings(args, tokenizers_only=False):
    """Whether the flags (before the preset fills them in) are the published sweep's: the cpu preset's
    defaults on the built-in data, nothing added (README, Results). tokenizers_only: whether each run
    would be one of the published sweep's (any token counts and seeds, the same flags)."""
    preset = {k: v for k, v in PRESETS["cpu"].items() if not (tokenizers_only and k in ("tokens", "ablation_tokens"))}
    return (args.preset == "cpu" and args.data == "builtin" and not args.captions and not args.train_flags
            and args.builtin_captions == "full"
            and (tokenizers_only or args.seeds == [0, 1, 2])
            and all(getattr(args, k) in (None, v) for k, v in preset.items()))


#################################################################################
#                                   The runs                                    #
#################################################################################

def plan(args):
    """Every run of the sweep: TexTok (text in both) and the baseline (none) at each token count
    and seed, then text in the tokenizer only and the detokenizer only at the ablation count."""
    # TexTok and its baseline share seed, data and init at each count: their difference is the caption's.
    runs = [(n, v, s) for n in args.tokens for s in args.seeds for v in ("both", "none")]
    if args.ablation_tokens:
        runs += [(args.ablation_tokens, v, s) for s in args.seeds for v in ("tokenizer", "detokenizer")]
    return [dict(name=f"n{n}-{v}-s{s}", num_tokens=n, text_in=v, seed=s) for n, v, s in runs]


def sweep_settings(args):
    """What every run shares; a rerun with other settings into the same --out is refused."""
    keys = ("model", "image_size", "patch_size", "steps", "batch_size", "lpips_weight", "num_images", "eval_images",
            "data", "captions", "train_flags")
    settings = {k: getattr(args, k) for k in keys}
    if args.builtin_captions != "full":  # only then: a sweep pinned before the flag existed still resumes
        settings["builtin_captions"] = args.builtin_captions
    return settings


def train_argv(args, run, folder):
    """The train.py command line of one run. Its held-out split is --val-images eval_images, the
    same images the evaluation below scores; checkpoints every 250 steps make a kill cheap."""
    # One evaluation, at the end (--eval-every --steps): the numbers that count are evaluate_run's. No
    # DataLoader workers: the runs are --jobs processes already, and workers would oversubscribe the cores.
    argv = ["--model", args.model, "--image-size", str(args.image_size), "--patch-size", str(args.patch_size),
            "--num-tokens", str(run["num_tokens"]), "--text-in", run["text_in"], "--seed", str(run["seed"]),
            "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lpips-weight", str(args.lpips_weight),
            "--num-images", str(args.num_images), "--val-images", str(args.eval_images), "--data", args.data,
            "--eval-every", str(args.steps), "--save-every", str(min(250, args.steps)), "--num-workers", "0",
            "--cache-dir", args.cache_dir, "--builtin-captions", args.builtin_captions, "--out", folder,
            *args.train_flags.split()]
    if args.captions:
        argv += ["--captions", args.captions]
    if args.skip_bad:
        argv.append("--skip-bad")
    if os.path.isfile(os.path.join(folder, "ckpt-latest.pt")):
        argv.append("--resume")  # a run the last sweep did not finish
    return argv


_eval_tools = {}  # per worker process: the Inception, LPIPS and text encoders, loaded once


def evaluate_run(folder, args, seed):
    """Held-out metrics of a trained run: eval_fid.py's reconstruction metrics with each image's
    own caption (rFID too), and PSNR with the next image's caption and with an empty one."""
    from data import load_splits, spread_sample
    from eval_fid import Inception, Stats, evaluate_reconstruction
    from textok import LPIPS, TexTok, TextEncoder
    # The EMA weights train.py exported, on the held-out split train.py kept out of training.
    tok = TexTok.from_pretrained(os.path.join(folder, "tokenizer")).eval()
    train_set, held_out = load_splits(args.data, args.captions, args.image_size, seed, args.num_images,
                                      args.eval_images, args.skip_bad, progress=False,
                                      builtin_captions=args.builtin_captions)
    # The networks are loaded once per worker process and kept: every run is scored by the same ones.
    if "inception" not in _eval_tools:
        _eval_tools.update(inception=Inception(), lpips=LPIPS.load())
    encoder = None
    if tok.cfg.text_in != "none":
        key = (tok.cfg.text_encoder, tok.cfg.text_len)
        encoder = _eval_tools.get(key) or _eval_tools.setdefault(key, TextEncoder(*key))
    real = _eval_tools.setdefault(("real", seed), Stats())  # the originals' Inception statistics, once per seed
    own = evaluate_reconstruction(tok, held_out, _eval_tools["inception"], encoder, 64, (), _eval_tools["lpips"],
                                  real_stats=real)
    result = {k: own["captions"][k] for k in METRICS}
    if encoder is not None:  # the caption tests: PSNR only (no Inception), so they cost little
        tests = evaluate_reconstruction(tok, held_out, None, encoder, 64, ("other", "empty"))
        result.update(psnr_other=tests["other captions"]["psnr"], psnr_empty=tests["empty captions"]["psnr"])
    # The same tests on as many images the run trained on: a caption worth more there than on held-out
    # images is one the detokenizer has learnt to recognise ("this caption, this picture"), not to read.
    seen = spread_sample(train_set, args.eval_images)
    tests = evaluate_reconstruction(tok, seen, None, encoder, 64, ("other", "empty"))
    result["train_psnr"] = tests["captions"]["psnr"]
    if encoder is not None:
        result.update(train_psnr_other=tests["other captions"]["psnr"], train_psnr_empty=tests["empty captions"]["psnr"])
    return result


def run_one(run, args, threads):
    """Trains and evaluates one run (in a worker process, its output in <run>/run.log); writes
    <run>/result.json last, atomically, so a result on disk always belongs to a finished run."""
    import train
    # Each run takes its share of the cores (main: cores // --jobs); torch would otherwise take them all.
    torch.set_num_threads(threads)
    # Runs in one process (--jobs 1, a GPU) each compile their own networks: after 8 of them torch.compile
    # would reach its recompile limit and quietly run the rest uncompiled, so their times would not compare.
    torch._dynamo.reset()
    folder = os.path.join(args.out, run["name"])
    os.makedirs(folder, exist_ok=True)
    # train.py's output goes to the run's own log: --jobs runs at once would interleave their progress bars.
    log_path = os.path.join(folder, "run.log")
    try:
        with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            t0 = time.time()
            train.main(train_argv(args, run, folder))
            result = {**run, "steps": args.steps, "train_seconds": round(time.time() - t0, 1),
                      **evaluate_run(folder, args, run["seed"]), "eval_images": args.eval_images}
    except KeyboardInterrupt:  # not train.py's own resume command: the sweep resumes its runs
        raise KeyboardInterrupt(f"the sweep stopped in run {run['name']}; run the same command again to resume "
                                f"it") from None
    except (UserError, SystemExit) as e:  # said in the run's log only; the sweep says which run, and what to do
        why = str(e) if isinstance(e, UserError) else f"train.py refused its flags (see {log_path})"
        raise UserError(f"run {run['name']} failed: {why}  (its log: {log_path}; to redo the run, delete "
                        f"{folder} and run the sweep again)") from None
    write_json(os.path.join(folder, "result.json"), result)
    return result


def worker_pool(jobs: int) -> ProcessPoolExecutor:
    """The pool of a --jobs sweep. spawn, not fork: each worker starts a fresh interpreter, not a copy
    of this one's torch state (a forked child inherits its thread pool, and cannot initialise CUDA
    once the parent has). Each worker ends with the sweep (end_with_parent)."""
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=end_with_parent, initargs=(os.getpid(),))


def end_with_parent(parent: int) -> None:
    """A sweep worker's start: a thread that ends the worker once the sweep that started it is gone.
    Ctrl-C signals the whole process group, but `kill <pid>` of the sweep alone would leave its
    workers training on, holding their runs' locks, with no one to record what they finish."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)  # the run's lock is taken over by the next sweep (files.lock_out: its pid is gone)
    threading.Thread(target=watch, daemon=True).start()


def read_result(args, run):
    """A finished run's result.json, with the attention its last evaluation in train.py gave to
    the caption (mean over layers, from its log.jsonl); None for an unfinished run."""
    folder = os.path.join(args.out, run["name"])
    if not os.path.isfile(os.path.join(folder, "result.json")):
        return None
    with open(os.path.join(folder, "result.json")) as f:
        result = json.load(f)
    with open(os.path.join(folder, "log.jsonl")) as f:
        evals = [r["eval"] for r in map(json.loads, f) if "eval" in r]
    # The last evaluation is at --steps (train_argv): the finished model's attention to the caption.
    for part, shares in (evals[-1].get("text_attention", {}) if evals else {}).items():
        if shares:
            result[f"attention_{part}"] = sum(shares) / len(shares)
    return result


#################################################################################
#                                  The summary                                  #
#################################################################################

def mean_std(values):
    """(mean, standard deviation) of the values that are not None; (None, None) when none is, and a
    standard deviation of 0 for a single value."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    m = sum(values) / len(values)
    # n - 1: the sample standard deviation, since the seeds are a sample of the runs one could make.
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def summarise(runs):
    """Per (token count, variant): each metric's mean and standard deviation over seeds; per token
    count, TexTok's gain over the baseline, computed seed by seed (the two share their data,
    initialisation and held-out images) and then averaged: rFID as the paper reports it, a
    relative reduction, and PSNR in dB."""
    # The runs grouped by (token count, variant), in Table 1's order and Table 4d's within a count.
    rows = {}
    for r in runs:
        rows.setdefault((r["num_tokens"], r["text_in"]), []).append(r)
    summary = []
    for (n, v), rs in sorted(rows.items(), key=lambda kv: (kv[0][0], VARIANTS.index(kv[0][1]))):
        row = {"num_tokens": n, "text_in": v, "seeds": sorted(r["seed"] for r in rs)}
        for k in (*METRICS, "psnr_other", "psnr_empty", "attention_tokenizer", "attention_detokenizer",
                  "train_psnr", "train_psnr_other", "train_psnr_empty"):
            row[k], row[f"{k}_std"] = mean_std([r.get(k) for r in rs])
        # What the caption is worth (own against the next image's), on held-out and on training images.
        for k, own, other in (("worth", "psnr", "psnr_other"), ("train_worth", "train_psnr", "train_psnr_other")):
            row[k], row[f"{k}_std"] = mean_std([r[own] - r[other] for r in rs if r.get(other) is not None])
        if v != "none" and (n, "none") in rows:
            # Paired by seed: what the two runs of a seed share (data order, init) cancels, so the spread
            # left is that of the caption's effect, not of the seeds.
            base = {r["seed"]: r for r in rows[(n, "none")]}
            paired = [(r, base[r["seed"]]) for r in rs if r["seed"] in base]
            row["rfid_gain"], row["rfid_gain_std"] = mean_std([100 * (b["rfid"] - t["rfid"]) / b["rfid"] for t, b in paired])
            row["psnr_gain"], row["psnr_gain_std"] = mean_std([t["psnr"] - b["psnr"] for t, b in paired])
            row["train_psnr_gain"], row["train_psnr_gain_std"] = mean_std(
                [t["train_psnr"] - b["train_psnr"] for t, b in paired if "train_psnr" in t and "train_psnr" in b])
        summary.append(row)
    return summary


def fmt(row, k, digits):
    """'mean ± std' of metric k of a summary row, to `digits` decimals; empty when it is missing."""
    m, s = row.get(k), row.get(f"{k}_std")
    return "" if m is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown(summary, args, minutes):
    """table1.md: Table 1's layout (TexTok against the baseline per token count, with the gains),
    the Table 4d ablation when it ran, how much the caption is used, and the settings behind it."""
    # The rFID gain is relative, as the paper reports it; the PSNR gain is in dB.
    name = {"none": "Baseline (w/o text)", "both": "TexTok"}
    lines = ["| # tokens | variant | rFID | PSNR | SSIM | LPIPS | rFID gain | PSNR gain |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in summary:
        if row["text_in"] in name:
            gain = [f"{row['rfid_gain']:+.1f}% ± {row['rfid_gain_std']:.1f}", f"{row['psnr_gain']:+.2f} ± "
                    f"{row['psnr_gain_std']:.2f} dB"] if row.get("rfid_gain") is not None else ["", ""]
            lines.append(f"| {row['num_tokens']} | {name[row['text_in']]} | {fmt(row, 'rfid', 1)} | {fmt(row, 'psnr', 2)} "
                         f"| {fmt(row, 'ssim', 3)} | {fmt(row, 'lpips', 3)} | {' | '.join(gain)} |")
    ablation = [r for r in summary if r["num_tokens"] == args.ablation_tokens]
    if any(r["text_in"] in ("tokenizer", "detokenizer") for r in ablation):
        lines += ["", f"Where the text enters, at {args.ablation_tokens} tokens (paper Table 4d):", "",
                  "| text in | rFID | PSNR | SSIM | LPIPS |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['text_in']} | {fmt(r, 'rfid', 1)} | {fmt(r, 'psnr', 2)} | {fmt(r, 'ssim', 3)} | {fmt(r, 'lpips', 3)} |"
                  for r in ablation]
    lines += ["", "How much TexTok uses the caption: held-out PSNR (dB) with each image's own caption, the next "
                  "image's and an empty one; the share of attention the image side gives to the caption (mean over "
                  "layers):", "",
              "| # tokens | text in | own caption | next image's caption | empty caption | attention, tokenizer | "
              "attention, detokenizer |", "| --- | --- | --- | --- | --- | --- | --- |"]
    pct = lambda r, k: "" if r.get(k) is None else f"{100 * r[k]:.0f}% ± {100 * r[f'{k}_std']:.0f}"
    lines += [f"| {r['num_tokens']} | {r['text_in']} | {fmt(r, 'psnr', 2)} | {fmt(r, 'psnr_other', 2)} | "
              f"{fmt(r, 'psnr_empty', 2)} | {pct(r, 'attention_tokenizer')} | {pct(r, 'attention_detokenizer')} |"
              for r in summary if r["text_in"] != "none"]
    seen = [r for r in summary if r["text_in"] != "none" and r.get("train_worth") is not None]
    if seen:  # runs from before the training-image tests have no such numbers
        lines += ["", "The caption on images the tokenizer trained on, against held-out images (as many of each): a "
                      "caption worth more on training images is recognised (\"this caption, this picture\") more "
                      "than read:", "",
                  "| # tokens | text in | gain over the baseline, held-out | the same, training images | own caption "
                  "against the next image's, held-out | the same, training images |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['num_tokens']} | {r['text_in']} | {fmt(r, 'psnr_gain', 2)} | {fmt(r, 'train_psnr_gain', 2)} | "
                  f"{fmt(r, 'worth', 2)} | {fmt(r, 'train_worth', 2)} |" for r in seen]
    # The hardware and the budget go beside the numbers: a table compares only with one of the same budget.
    hw = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()}-core CPU, {args.jobs} run(s) at a time"
    seeds = len(args.seeds)
    # A folder holds out at most a tenth of its images (data.load_splits), which can be fewer than --eval-images.
    held_out = args.eval_images if args.data == "builtin" else f"up to {args.eval_images} (at most a tenth of the data)"
    lines += ["", f"Mean ± standard deviation over {seeds} seed(s); gains are TexTok against the baseline of the same "
                  f"seed. {args.model}, {args.image_size} px, patch {args.patch_size}, {args.steps} steps of batch "
                  f"{args.batch_size}, LPIPS weight {args.lpips_weight}; {held_out} held-out images per run (rFID "
                  f"at this count is not comparable with 50k-image numbers). {hw}: {minutes:.0f} minutes in train.py, "
                  f"summed over the runs (a resumed run counts from its last resume)."
                  + (f" Every run also had `{args.train_flags}`." if args.train_flags else "")
                  + (f" Built-in captions: {args.builtin_captions}." if args.builtin_captions != "full" else "")]
    return "\n".join(lines) + "\n"


def plot(summary, path):
    """rFID and PSNR against the token count, TexTok and baseline, error bars one standard deviation."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, k, label in zip(axes, ("rfid", "psnr"), ("rFID (lower is better)", "PSNR, dB (higher is better)")):
        for v, name, color in (("none", "Baseline (w/o text)", "tab:blue"), ("both", "TexTok", "tab:red")):
            rows = [r for r in summary if r["text_in"] == v]
            ax.errorbar([r["num_tokens"] for r in rows], [r[k] for r in rows], yerr=[r[f"{k}_std"] for r in rows],
                        label=name, color=color, marker="o", capsize=3)
        ax.set_xscale("log", base=2)  # the paper's token counts double from one to the next
        ax.set_xticks([r["num_tokens"] for r in summary if r["text_in"] == "none"])
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.minorticks_off()
        ax.set_xlabel("number of tokens")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def figure(args, seed, path, count=6):
    """Fig. 1 style: held-out inputs, then baseline and TexTok reconstructions per token count."""
    from data import load_splits
    from pixels import save_grid
    from textok import TexTok, TextEncoder
    _, held_out = load_splits(args.data, args.captions, args.image_size, seed, args.num_images, args.eval_images,
                              args.skip_bad, progress=False, builtin_captions=args.builtin_captions)
    count = min(count, len(held_out))
    x = torch.stack([held_out[i][0] for i in range(count)])
    captions = held_out.captions[:count]
    # One column per (token count, variant) at this seed: each run's EMA tokenizer, decoding its posterior mean.
    cols, titles, encoders = [x], ["input"], {}
    for n in args.tokens:
        for v in ("none", "both"):
            folder = os.path.join(args.out, f"n{n}-{v}-s{seed}", "tokenizer")
            if not os.path.isdir(folder):
                continue
            tok = TexTok.from_pretrained(folder).eval()
            text = mask = None
            if v == "both":
                key = (tok.cfg.text_encoder, tok.cfg.text_len)
                text, mask = (encoders.get(key) or encoders.setdefault(key, TextEncoder(*key)))(captions)
            cols.append(tok(x, text, mask, sample=False)[0].clamp(-1, 1))
            titles.append(f"{'base' if v == 'none' else 'TexTok'} {n}")
    save_grid(path, [torch.stack([c[i] for c in cols]) for i in range(count)], titles, captions)


def update_readme(md, path="README.md", markers="table"):
    """Replaces the README's block between the reproduce markers ("table": the reconstruction sweep's,
    "generation": the generation sweep's) with the fresh table, atomically: a crash mid-write leaves the
    previous README, never a truncated one."""
    begin, end = f"<!-- reproduce.py {markers}: begin -->", f"<!-- reproduce.py {markers}: end -->"
    if not os.path.isfile(path):
        return
    with open(path) as f:
        text = f.read()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        write_text(path, head + begin + "\n" + md + end + rest.split(end, 1)[1])


def report(args, runs, command):
    """The summary of the finished runs: table1.json, table1.md, table1.png and fig1.png in --results
    (and the README's table, for the built-in sweep); None while no run has finished."""
    results = [r for r in (read_result(args, run) for run in runs) if r]
    if not results:
        print("no finished runs to summarise yet")
        return None
    os.makedirs(args.results, exist_ok=True)
    summary = summarise(results)
    minutes = sum(r["train_seconds"] for r in results) / 60
    md = markdown(summary, args, minutes)
    out = {"command": command, "settings": sweep_settings(args), "seeds": args.seeds, "runs": results, "summary": summary}
    write_json(os.path.join(args.results, "table1.json"), out)
    write_text(os.path.join(args.results, "table1.md"), md)
    plot(summary, os.path.join(args.results, "table1.png"))
    figure(args, args.seeds[0], os.path.join(args.results, "fig1.png"))
    # Only the built-in sweep's numbers are the README's: another dataset's stay in its own --results.
    if os.path.normpath(args.results) == os.path.normpath("docs/results"):
        update_readme(md)
    print(md + f"\nwritten to {args.results}/ (table1.json, table1.md, table1.png, fig1.png)")
    return out


#################################################################################
#                      The generation sweep (--generation)                      #
#################################################################################

# How every generation run samples: train.py's and sample.py's defaults (DDIM, 50 steps, guidance 4).
GEN_SAMPLING = dict(cfg_scale=4.0, sample_steps=50)


def plan_generation(args):
    """The generation sweep's jobs, one per tokenizer run of plan(): the tokenizer (trained here
    unless the reconstruction sweep has done it), then its DiTs in turn, so that two workers never
    train one tokenizer: DiT-T2I on TexTok's and the baseline's tokens at every count and seed
    (Table 3), and at --class-tokens a class-conditional DiT too (Table 1's gFID)."""
    return [dict(run, dits=["text"] + (["class"] if run["num_tokens"] == args.class_tokens else []))
            for run in plan(args)]


def generation_settings(args):
    """What every DiT of the sweep shares; a rerun with others into the same --out is refused."""
    return {"dit_model": args.dit_model, "dit_steps": args.dit_steps, "dit_batch_size": args.dit_batch_size,
            "num_samples": args.eval_images, **GEN_SAMPLING}


def dit_argv(args, run, cond, folder):
    """train.py --stage dit on the run's tokenizer, with the run's data, split and seed: the DiT learns
    the tokens of exactly the images the tokenizer trained on, and never sees the held-out ones."""
    argv = ["--stage", "dit", "--tokenizer", os.path.join(args.out, run["name"], "tokenizer"),
            "--dit-model", args.dit_model, "--dit-cond", cond, "--data", args.data, "--seed", str(run["seed"]),
            "--num-images", str(args.num_images), "--val-images", str(args.eval_images), "--steps", str(args.dit_steps),
            "--batch-size", str(args.dit_batch_size), "--eval-every", str(args.dit_steps),
            "--save-every", str(min(500, args.dit_steps)), "--num-workers", "0", "--cache-dir", args.cache_dir,
            "--out", folder]
    if args.captions:
        argv += ["--captions", args.captions]
    if args.skip_bad:
        argv.append("--skip-bad")
    if os.path.isfile(os.path.join(folder, "ckpt-latest.pt")):
        argv.append("--resume")
    return argv


def real_stats(held_out, seed, inception):
    """The held-out originals' Inception statistics (the FID reference), once per seed per worker: the
    same images as the reconstruction sweep's rFID reference, so gFID and rFID share it."""
    from eval_fid import Stats
    from pixels import to_uint8
    stats = _eval_tools.setdefault(("real", seed), Stats())
    if stats.n == 0:
        for x, _, _ in torch.utils.data.DataLoader(held_out, batch_size=64):
            stats.update(inception(to_uint8(x))[0].numpy())
    return stats


@torch.no_grad()
def draw_samples(dit, tok, meta, encoder, labels, prompts, dec_captions, seed, batch_size=64):
    """uint8 samples (K, H, W, 3), one per entry, and the seconds they took (prompt to pixels). Batch
    i's noise comes from (seed, i), so the same call with other decoding captions decodes the same
    latents (DDIM with eta 0 is deterministic given its noise)."""
    from dit import generate
    from pixels import to_uint8
    images, seconds = [], 0.0
    for i in range(0, len(dec_captions), batch_size):
        t0 = time.time()
        y = torch.tensor(labels[i:i + batch_size]) if labels is not None else None  # (b,)
        text = mask = dec = dec_mask = None
        if prompts is not None:
            text, mask = encoder(prompts[i:i + batch_size])  # (b, Lt, Dt), (b, Lt)
        if dec_captions[i] is not None:  # a tokenizer that reads text decodes with a caption
            same = prompts is not None and dec_captions[i:i + batch_size] == prompts[i:i + batch_size]
            dec, dec_mask = (text, mask) if same else encoder(dec_captions[i:i + batch_size])
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        x = generate(dit, tok, meta, y, text, mask, dec, dec_mask, GEN_SAMPLING["cfg_scale"],
                     GEN_SAMPLING["sample_steps"], "ddim", 0.0, g)  # (b, 3, H, W)
        seconds += time.time() - t0
        images.append(to_uint8(x))
    return np.concatenate(images), seconds


def evaluate_generation_run(folder, args, run, cond):
    """A trained DiT's samples against the held-out images. T2I: one sample per held-out caption,
    decoded with that caption; gFID, prompt adherence (built-in captions) and, for a tokenizer that
    reads text, both again with the same latents decoded with an empty caption: how much of what
    the samples show the detokenizer read from the prompt rather than the DiT generated. Class:
    one sample per held-out image's class, decoded with an unseen caption of the class (sample.py's
    built-in list), as the paper does; gFID only. Also the seconds per image, and bench.py's DiT of
    the same size on a 2D latent grid at this image size (paper Fig. 4), timed in the same process."""
    import bench
    from data import load_splits, prompt_adherence
    from eval_fid import Inception, Stats, frechet_distance
    from sample import builtin_class_captions, load_dit, load_tokenizer
    from textok import TextEncoder
    dit, meta = load_dit(os.path.join(folder, "ckpt-latest.pt"))
    tok = load_tokenizer(meta["tokenizer"], meta)
    _, held_out = load_splits(args.data, args.captions, args.image_size, run["seed"], args.num_images,
                              args.eval_images, args.skip_bad, progress=False, builtin_captions=args.builtin_captions)
    if "inception" not in _eval_tools:
        _eval_tools["inception"] = Inception()
    inception = _eval_tools["inception"]
    key = (meta["text_encoder"], meta["text_len"])
    encoder = _eval_tools.get(key) or _eval_tools.setdefault(key, TextEncoder(*key))
    tok_text = tok.cfg.cond == "text" and tok.cfg.text_in != "none"
    seed = run["seed"]
    if cond == "text":
        labels, prompts = None, list(held_out.captions)
        dec = prompts if tok_text else [None] * len(prompts)
    else:
        labels, prompts = [int(v) for v in held_out.labels], None
        pool, rng = builtin_class_captions(), np.random.default_rng(seed)
        dec = [pool[c][rng.integers(len(pool[c]))] if tok_text else None for c in labels]
    images, seconds = draw_samples(dit, tok, meta, encoder, labels, prompts, dec, seed)
    real = real_stats(held_out, seed, inception)

    def gfid(x):
        fake = Stats()
        for i in range(0, len(x), 64):
            fake.update(inception(x[i:i + 64])[0].numpy())
        return frechet_distance(*fake.mu_sigma(), *real.mu_sigma())

    def adherence(x):
        score = prompt_adherence(x, prompts)[0] if prompts is not None else float("nan")
        return None if score != score else score  # NaN: captions outside the built-in grammar

    result = {"gfid": gfid(images), "adherence": adherence(images), "seconds_per_image": seconds / len(images),
              "num_samples": len(images), "threads": torch.get_num_threads()}
    if cond == "text" and tok_text:
        empty, _ = draw_samples(dit, tok, meta, encoder, labels, prompts, [""] * len(prompts), seed)
        result.update(gfid_empty=gfid(empty), adherence_empty=adherence(empty))
    grid = bench.bench_generation(bench.get_args([
        "--tokenizer", args.model, "--image-size", str(args.image_size), "--patch-size", str(args.patch_size),
        "--num-tokens", str(run["num_tokens"]), "--dit", args.dit_model, "--text-dim", str(tok.cfg.text_dim),
        "--text-len", str(tok.cfg.text_len), "--batch-size", "16", "--sample-steps",
        str(GEN_SAMPLING["sample_steps"]), "--cfg-scale", str(GEN_SAMPLING["cfg_scale"]), "--no-compile"]
        + (["--t2i"] if cond == "text" else [])), torch.device("cpu"), contextlib.nullcontext())
    result["seconds_per_image_2d_grid"] = grid["s_per_img_2d_grid"]
    return result


def generation_one(job, args, threads):
    """One job of the generation sweep (in a worker process): the tokenizer run if unfinished, then
    each of its DiTs that has no result.json yet: train.py --stage dit (output in <dit>/run.log), then
    evaluate_generation_run. -> the results of the job's DiTs."""
    import train
    torch.set_num_threads(threads)
    if read_result(args, job) is None:
        run_one({k: job[k] for k in ("name", "num_tokens", "text_in", "seed")}, args, threads)
    results = []
    for cond in job["dits"]:
        name = f"{job['name']}/dit-{cond}"
        folder = os.path.join(args.out, name)
        done = read_generation_result(args, name)
        if done:
            results.append(done)
            continue
        os.makedirs(folder, exist_ok=True)
        log_path = os.path.join(folder, "run.log")
        try:
            with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                t0 = time.time()
                train.main(dit_argv(args, job, cond, folder))
                result = {"name": name, "text_in": job["text_in"], "num_tokens": job["num_tokens"],
                          "seed": job["seed"], "dit_cond": cond, "dit_model": args.dit_model,
                          "dit_steps": args.dit_steps, "train_seconds": round(time.time() - t0, 1),
                          **evaluate_generation_run(folder, args, job, cond)}
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"the sweep stopped in run {name}; run the same command again to resume "
                                    f"it") from None
        except (UserError, SystemExit) as e:
            why = str(e) if isinstance(e, UserError) else f"train.py refused its flags (see {log_path})"
            raise UserError(f"run {name} failed: {why}  (its log: {log_path}; to redo the run, delete "
                            f"{folder} and run the sweep again)") from None
        write_json(os.path.join(folder, "result.json"), result)
        results.append(result)
    return results


def read_generation_result(args, name):
    """A finished DiT run's result.json, or None."""
    path = os.path.join(args.out, name, "result.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def summarise_generation(runs):
    """Per (DiT conditioning, token count, tokenizer): mean and standard deviation over seeds of
    each number; TexTok's gain over the baseline paired by seed, as for Table 1: gFID as a
    relative reduction (the paper's %), prompt adherence as a difference."""
    rows = {}
    for r in runs:
        rows.setdefault((r["dit_cond"], r["num_tokens"], r["text_in"]), []).append(r)
    summary = []
    for (cond, n, v), rs in sorted(rows.items(), key=lambda kv: (kv[0][0] != "text", kv[0][1], kv[0][2] != "none")):
        row = {"dit_cond": cond, "num_tokens": n, "text_in": v, "seeds": sorted(r["seed"] for r in rs)}
        for k in ("gfid", "adherence", "gfid_empty", "adherence_empty", "seconds_per_image",
                  "seconds_per_image_2d_grid"):
            row[k], row[f"{k}_std"] = mean_std([r.get(k) for r in rs])
        if v != "none" and (cond, n, "none") in rows:
            base = {r["seed"]: r for r in rows[(cond, n, "none")]}
            paired = [(r, base[r["seed"]]) for r in rs if r["seed"] in base]
            row["gfid_gain"], row["gfid_gain_std"] = mean_std([100 * (b["gfid"] - t["gfid"]) / b["gfid"]
                                                               for t, b in paired])
            row["adherence_gain"], row["adherence_gain_std"] = mean_std(
                [t["adherence"] - b["adherence"] for t, b in paired if t.get("adherence") is not None
                 and b.get("adherence") is not None])
        summary.append(row)
    return summary


def generation_markdown(summary, recon, args, minutes):
    """generation.md: gFID and prompt adherence per token count, TexTok against the baseline with the
    seed-paired gains and, beside them, the same tokenizers' rFID gain (does the one follow the
    other?); then what the detokenizer reads from the prompt; then the settings."""
    rfid_gain = {r["num_tokens"]: r for r in recon if r["text_in"] == "both" and r.get("rfid_gain") is not None}
    name = {"none": "Baseline (w/o text)", "both": "TexTok"}
    lines = ["| DiT | # tokens | tokenizer | gFID | prompt adherence | gFID gain | adherence gain | rFID gain of "
             "the same tokenizers | s / image | s / image, 2D grid |", "| --- | --- | --- | --- | --- | --- | --- | "
             "--- | --- | --- |"]
    for r in summary:
        gain = ["", "", ""]
        if r.get("gfid_gain") is not None:
            rec = rfid_gain.get(r["num_tokens"])
            gain = [f"{r['gfid_gain']:+.1f}% ± {r['gfid_gain_std']:.1f}",
                    "" if r.get("adherence_gain") is None else f"{r['adherence_gain']:+.3f} ± {r['adherence_gain_std']:.3f}",
                    "" if rec is None else f"{rec['rfid_gain']:+.1f}% ± {rec['rfid_gain_std']:.1f}"]
        lines.append(f"| {'T2I' if r['dit_cond'] == 'text' else 'class'} | {r['num_tokens']} | {name[r['text_in']]} | "
                     f"{fmt(r, 'gfid', 1)} | {fmt(r, 'adherence', 3)} | {' | '.join(gain)} | "
                     f"{r['seconds_per_image'] * 1000:.1f} ms | {r['seconds_per_image_2d_grid'] * 1000:.1f} ms |")
    read = [r for r in summary if r["dit_cond"] == "text" and r.get("adherence_empty") is not None]
    if read:
        lines += ["", "What the detokenizer reads from the prompt: TexTok's T2I samples decoded with their prompt, "
                      "and the same latents decoded with an empty caption:", "",
                  "| # tokens | adherence, prompt | adherence, empty caption | gFID, prompt | gFID, empty caption |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['num_tokens']} | {fmt(r, 'adherence', 3)} | {fmt(r, 'adherence_empty', 3)} | {fmt(r, 'gfid', 1)} "
                  f"| {fmt(r, 'gfid_empty', 1)} |" for r in read]
    hw = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()}-core CPU, {args.jobs} run(s) at a time"
    lines += ["", f"Mean ± standard deviation over {len(args.seeds)} seed(s); gains are TexTok against the baseline of "
                  f"the same seed (gFID: relative reduction). {args.dit_model}, {args.dit_steps} steps of batch "
                  f"{args.dit_batch_size}, on the tokens of the reconstruction sweep's tokenizers ({args.model}, "
                  f"{args.image_size} px, {args.steps} steps). One sample per held-out image ({args.eval_images}), "
                  f"DDIM {GEN_SAMPLING['sample_steps']} steps, guidance {GEN_SAMPLING['cfg_scale']}; gFID against "
                  f"the held-out images at this count (not comparable with 50k-sample numbers). T2I samples take "
                  f"the held-out captions as prompts; class samples, an unseen caption of their class for the "
                  f"detokenizer. Seconds per image: prompt to pixels, batch 64, "
                  f"{max(1, (os.cpu_count() or 1) // args.jobs)} thread(s) per run, {args.jobs} run(s) at a time; the 2D grid is bench.py's same-size DiT on SD-VAE-shaped latents "
                  f"({(args.image_size // 16) ** 2} tokens at this image size), timed in the same process. {hw}: "
                  f"{minutes:.0f} minutes in train.py --stage dit, summed over the runs."]
    return "\n".join(lines) + "\n"


def plot_generation(summary, path):
    """gFID and prompt adherence against the token count (T2I, error bars one standard deviation),
    and gFID against the seconds per image (paper Fig. 4, from the measured points)."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    t2i = [r for r in summary if r["dit_cond"] == "text"]
    for v, name, color in (("none", "Baseline (w/o text)", "tab:blue"), ("both", "TexTok", "tab:red")):
        rows = [r for r in t2i if r["text_in"] == v]
        for ax, k in zip(axes[:2], ("gfid", "adherence")):
            rows_k = [r for r in rows if r[k] is not None]
            ax.errorbar([r["num_tokens"] for r in rows_k], [r[k] for r in rows_k], yerr=[r[f"{k}_std"] for r in rows_k],
                        label=name, color=color, marker="o", capsize=3)
        axes[2].errorbar([r["seconds_per_image"] * 1000 for r in rows], [r["gfid"] for r in rows],
                         yerr=[r["gfid_std"] for r in rows], color=color, marker="o", capsize=3, ls="none", label=name)
        for r in rows:
            axes[2].annotate(f"{r['num_tokens']}", (r["seconds_per_image"] * 1000, r["gfid"]), fontsize=8,
                             xytext=(4, 4), textcoords="offset points")
    if t2i:
        axes[2].axvline(t2i[0]["seconds_per_image_2d_grid"] * 1000, color="gray", ls="--", label="2D grid (time only)")
    for ax, title in zip(axes, ("gFID, T2I (lower is better)", "prompt adherence (higher is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["num_tokens"] for r in t2i}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.minorticks_off()
        ax.set_xlabel("number of tokens")
        ax.set_title(title)
    axes[2].set_xlabel("ms per image (prompt to pixels)")
    axes[2].set_title("gFID against generation time (Fig. 4)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def figure5(args, seed, path, count=6):
    """Fig. 5 style: held-out prompts, the real image, then baseline and TexTok samples at each token
    count (the DiT-T2I of each, the same noise for every column)."""
    from data import load_splits
    from pixels import save_grid
    from sample import load_dit, load_tokenizer
    from textok import TextEncoder
    _, held_out = load_splits(args.data, args.captions, args.image_size, seed, args.num_images, args.eval_images,
                              args.skip_bad, progress=False, builtin_captions=args.builtin_captions)
    count = min(count, len(held_out))
    prompts = list(held_out.captions[:count])
    cols, titles = [torch.stack([held_out[i][0] for i in range(count)])], ["real"]
    for n in args.tokens:
        for v in ("none", "both"):
            if read_generation_result(args, f"n{n}-{v}-s{seed}/dit-text") is None:  # unfinished
                continue
            ckpt = os.path.join(args.out, f"n{n}-{v}-s{seed}", "dit-text", "ckpt-latest.pt")
            dit, meta = load_dit(ckpt)
            tok = load_tokenizer(meta["tokenizer"], meta)
            encoder = TextEncoder(meta["text_encoder"], meta["text_len"])
            images, _ = draw_samples(dit, tok, meta, encoder, None, prompts,
                                     prompts if v == "both" else [None] * count, seed)
            cols.append(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)  # (count, 3, H, W)
            titles.append(f"{'base' if v == 'none' else 'TexTok'} {n}")
    save_grid(path, [torch.stack([c[i] for c in cols]) for i in range(count)], titles, prompts)


def report_generation(args, jobs, command):
    """generation.json (the command, every DiT run, the summary), generation.md, generation.png and
    fig5.png in --results (and the README's generation table, for the published sweep)."""
    runs = [r for job in jobs for cond in job["dits"] if (r := read_generation_result(args, f"{job['name']}/dit-{cond}"))]
    if not runs:
        print("no finished generation runs to summarise yet")
        return None
    os.makedirs(args.results, exist_ok=True)
    summary = summarise_generation(runs)
    recon = summarise([r for r in (read_result(args, job) for job in jobs) if r])
    md = generation_markdown(summary, recon, args, sum(r["train_seconds"] for r in runs) / 60)
    out = {"command": command, "settings": {**sweep_settings(args), **generation_settings(args)}, "seeds": args.seeds,
           "runs": runs, "summary": summary}
    write_json(os.path.join(args.results, "generation.json"), out)
    write_text(os.path.join(args.results, "generation.md"), md)
    plot_generation(summary, os.path.join(args.results, "generation.png"))
    figure5(args, args.seeds[0], os.path.join(args.results, "fig5.png"))
    if os.path.normpath(args.results) == os.path.normpath("docs/results"):
        update_readme(md, markers="generation")
    print(md + f"\nwritten to {args.results}/ (generation.json, generation.md, generation.png, fig5.png)")
    return out


#################################################################################
#                                     Main                                      #
#################################################################################

def pin_settings(args, filename, settings):
    """<out>/<filename> pins the settings a sweep's runs share: runs made with other settings would be
    averaged together, so a rerun with others into the same --out is refused."""
    path = os.path.join(args.out, filename)
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if changed:
            raise UserError(f"{args.out} holds a sweep with other settings (saved, now): {changed}; resume it with "
                            f"the same flags, or pass another --out")
    elif not args.report:  # written by a sweep that trains: a --report of nothing pins no settings
        os.makedirs(args.out, exist_ok=True)
        write_json(path, settings)


def execute(args, todo, total, work, said):
    """Runs work(item, args, threads) for every item of `todo`, `--jobs` at a time, with a progress bar
    over `total` items; said(result) is the line each finished item prints. A failed item is said at
    the end; the others go on."""
    from tqdm import tqdm
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"{total} runs, {total - len(todo)} already done; {len(todo)} to go, {args.jobs} at a time "
          f"({threads} thread(s) each); logs in {args.out}/<run>/run.log")
    bar = tqdm(total=total, initial=total - len(todo), desc="reproduce", unit="run")
    failed = []

    def done(result):
        bar.write(said(result))
        bar.update(1)
    if args.jobs == 1:  # in this process (a GPU, or a one-core machine)
        for item in todo:
            try:
                done(work(item, args, threads))
            except UserError as e:
                bar.write(f"error: {e}")
                failed.append(e)
    else:
        with worker_pool(args.jobs) as pool:
            for future in as_completed([pool.submit(work, item, args, threads) for item in todo]):
                try:
                    done(future.result())  # a failed run raises here (the work names it)
                except UserError as e:
                    bar.write(f"error: {e}")
                    failed.append(e)
    bar.close()
    if failed:
        raise UserError(f"{len(failed)} of {len(todo)} run(s) failed, the first: {failed[0]}")


def main(argv=None):
    """Plans the sweep, refuses to mix two sweeps' settings in one --out, trains and scores every run
    that has not finished, then reports (--report: reports only)."""
    args = get_args(argv)
    command = "python reproduce.py " + " ".join(sys.argv[1:] if argv is None else argv)
    runs = plan(args)
    # Every run's train.py flags are checked now, in one line on the terminal, not in the first run's log.
    import train
    train.get_args(train_argv(args, runs[0], os.path.join(args.out, runs[0]["name"])))
    pin_settings(args, "sweep.json", sweep_settings(args))
    if args.generation:
        train.get_args(dit_argv(args, runs[0], "text", os.path.join(args.out, runs[0]["name"], "dit-text")))
        pin_settings(args, "generation-sweep.json", generation_settings(args))
        jobs = plan_generation(args)
        # A job is finished when each of its DiTs has a result.json; the same command run again does the rest.
        todo = [job for job in jobs if any(read_generation_result(args, f"{job['name']}/dit-{c}") is None
                                           for c in job["dits"])]
        if not args.report and todo:
            execute(args, todo, len(jobs), generation_one, lambda rs: "; ".join(
                f"{r['name']}: gFID {r['gfid']:.1f}" + (f", adherence {r['adherence']:.3f}" if r.get("adherence")
                                                         is not None else "") for r in rs))
        return report_generation(args, jobs, command)
    # A run with a result.json is finished: the same command run again trains only the others.
    todo = [run for run in runs if read_result(args, run) is None]
    if not args.report and todo:
        execute(args, todo, len(runs), run_one, lambda r: f"{r['name']}: PSNR {r['psnr']:.2f} dB, rFID {r['rfid']:.1f}"
                + (f", with another caption {r['psnr_other']:.2f} dB" if "psnr_other" in r else ""))
    return report(args, runs, command)


if __name__ == "__main__":
    run_main(main)
