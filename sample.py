"""
Generates images with a trained DiT + TexTok (paper §3.2 "Generation stage"): the DiT samples the
N x d image tokens, the detokenizer turns them into pixels together with a caption.

    python sample.py                                    # a grid from out/dit (prompts or classes)
    python sample.py --prompt "a large red circle in the center, on a blue background"
    python sample.py --class-id 0 3 --class-captions unseen.jsonl
    torchrun --nproc_per_node=8 sample.py --num-samples 50000 --cfg-scale 1.5   # .npz for eval_fid.py

Text-to-image (DiT-T2I): the prompt conditions the DiT and the same prompt decodes the tokens.
Class-conditional: the DiT sees only the class; the detokenizer then gets an *unseen* caption
drawn from that class's caption list (captions never used in training), as the paper does for
ImageNet. The list is a JSON-lines file {"label": 3, "caption": "..."} (caption.py writes one),
or, for the built-in shapes, captions of freshly generated scenes that no run trains on.
"""
import argparse
import os
import zipfile

import numpy as np
import torch
from tqdm import tqdm

from data import ShapesDataset, class_labels, prompt_adherence, read_jsonl
from devices import Handoff, autocast, check_shared, distributed, share
from dit import DiT, Diffusion, generate
from files import (MissingFile, UserError, atomic_write, check_output, check_ranges, file_digest, flag_error,
                   flag_text, load_checkpoint, run_main, write_arrays)
from pixels import save_grid, to_uint8
from textok import TexTok, TextEncoder, pretrained_folder

#################################################################################
#                                  Loading                                      #
#################################################################################


def load_dit(path, device="cpu"):
    """A DiT from a training checkpoint (its EMA weights) or an exported folder, plus what it
    was trained against: the latent normalisation and the tokenizer folder."""
    if not os.path.exists(path):
        path = pretrained_folder(path)  # a hub repo id ("user/name") holding an exported DiT folder
    if not os.path.exists(path):
        raise MissingFile(f"{path} not found; train one with `python train.py --stage dit` or fix --dit")
    if os.path.isdir(path):
        return DiT.from_pretrained(path, device)
    fix = "pass a checkpoint of train.py --stage dit (out/dit/ckpt-latest.pt) or its exported folder (out/dit/dit)"
    ckpt = load_checkpoint(path, ("config", "ema"), fix)
    if "dit_meta" not in ckpt:
        raise UserError(f"{path} is not a DiT checkpoint (it has no 'dit_meta': a tokenizer's?); {fix}")
    model = DiT(DiT.config_from_dict(ckpt["config"]))
    # The EMA weights: what train.py evaluated and exports, and what DiT and ADM sample from.
    model.load_state_dict(ckpt["ema"])
    return model.to(device).eval(), ckpt["dit_meta"]


def load_tokenizer(path, meta, device="cpu"):
    """The tokenizer the DiT was trained on; any other is refused, its latents would mean nothing
    to the DiT: another config (--num-tokens, --text-len, ...) by the first setting that differs,
    one of the same config trained separately by the sha256 of its weights."""
    path = pretrained_folder(path)
    if not os.path.isdir(path):
        raise MissingFile(f"tokenizer folder {path} not found; pass --tokenizer (train.py writes out/textok/tokenizer)")
    tok = TexTok.from_pretrained(path, device).eval()
    fix = f"pass the --tokenizer it was trained with ({meta['tokenizer']}), or train a DiT on this one"
    for key, want in meta["tokenizer_config"].items():
        if getattr(tok.cfg, key, want) != want:
            raise UserError(f"tokenizer {path} has {key}={getattr(tok.cfg, key)!r} but the DiT was trained on "
                            f"{key}={want!r}; {fix}")
    digest = meta.get("tokenizer_sha256")  # DiTs trained before the digest was recorded have none
    if digest and file_digest(os.path.join(path, "model.safetensors")) != digest:
        raise UserError(f"tokenizer {path} has the config of the one the DiT was trained on but other weights "
                        f"(another sha256): trained separately; {fix}")
    return tok


def load_class_captions(path):
    """{label: [captions]} from a JSON-lines file of {"label": int, "caption": str}. A label is the
    class number the DiT was trained with: an int, or a string that is one ("7"), as train.py reads
    labels (data.class_labels); caption.py --holdout writes these numbers."""
    if not os.path.isfile(path):
        raise MissingFile(f"class caption file {path} not found; fix --class-captions")
    out = {}
    for n, r, problem in read_jsonl(path):
        if problem is None and not (isinstance(r.get("caption"), str) and r["caption"].strip()):
            problem = f"{path}:{n}: not a JSON object with an int 'label' and a non-empty 'caption'"
        if problem is None:
            label, names = class_labels([r.get("label")], [f"{path}:{n}"], check_range=False)
            if label is None or names is not None:
                problem = (f"{path}:{n}: label {r.get('label')!r} is not a class number; write the file with "
                           f"caption.py --holdout, which numbers the classes as train.py does")
        if problem is not None:
            raise UserError(problem)
        out.setdefault(label[0], []).append(r["caption"].strip())
    return out


UNSEEN_SEED = 12345  # built-in scenes of this seed are never trained on (runs use --seed and --seed + 1)


def builtin_class_captions(per_class=64, seed=UNSEEN_SEED):
    """Unseen captions per class for the built-in shapes: scenes from a seed no run trains on
    (training uses --seed, the held-out set --seed + 1)."""
    # The class is the first object's shape (6 classes): 12 x per_class scenes give each class about
    # 2 x per_class captions. Only captions are read, so the image size (8) never matters.
    data = ShapesDataset(per_class * 12, 8, seed=seed)
    out = {}
    for caption, label in zip(data.captions, data.labels):
        out.setdefault(label, []).append(caption)
    return out


#################################################################################
#                                     Main                                      #
#################################################################################

def get_args(argv=None):
    """The flags; a --steps the diffusion does not have, and sizes below 1, are refused here."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dit", default="out/dit/ckpt-latest.pt", help="DiT checkpoint (.pt) or exported folder")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the one the DiT was trained on)")
    p.add_argument("--prompt", nargs="+", default=None, help="text-to-image: one or more prompts")
    p.add_argument("--prompts-file", default=None, help="text-to-image: a text file, one prompt per line")
    p.add_argument("--class-id", type=int, nargs="+", default=None, help="class-conditional: the classes to draw")
    p.add_argument("--class-captions", default=None,
                   help="JSON lines {label, caption} of unseen captions per class (default for built-in data)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance (1: none)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    p.add_argument("--steps", type=int, default=50, help="sampling steps (paper's speed curves: 50-250)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic, 1: DDPM-like)")
    p.add_argument("--per-row", type=int, default=8, help="grid: samples per prompt / class")
    p.add_argument("--num-samples", type=int, default=0, help="write this many images to an .npz instead of a grid")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="grid PNG or .npz path (default: next to the DiT)")
    args = p.parse_args(argv)
    if not 1 <= args.steps <= Diffusion().T:
        flag_error(p, f"--steps {args.steps}: must be in 1..{Diffusion().T} (the diffusion's steps)")
    check_ranges(p, args, at_least_1=("per_row", "batch_size"), not_negative=("num_samples", "seed"))
    for name in ("prompts_file", "class_captions"):
        if getattr(args, name) is not None and not os.path.isfile(getattr(args, name)):
            flag_error(p, f"{flag_text(args, name)}: no such file; fix the path")
    # Checked before any sampling: a wrong suffix would otherwise surface only when the file is written.
    suffixes = (".npz",) if args.num_samples > 0 else (".png", ".jpg", ".jpeg")
    if args.out and not args.out.lower().endswith(suffixes):
        what = "--num-samples writes an .npz" if args.num_samples > 0 else "the grid is a .png or .jpg"
        flag_error(p, f"--out {args.out}: {what}; end the path with {suffixes[0]}")
    check_output(p, "--out", args.out)
    return args


def plan_rows(args, meta, t2i, tok_text):
    """
    What each output row shows, as (DiT labels, DiT prompts, decoding captions, class caption
    pool): T2I rows are prompts (--prompt, --prompts-file, or unseen built-in captions), each
    decoded with itself; class rows are classes (--class-id, or the first eight), decoded with
    captions drawn from the pool of that class's unseen captions when the tokenizer reads text.
    """
    if t2i:
        if args.class_id is not None:
            raise UserError(f"{args.dit} is a text-to-image DiT; pass --prompt or --prompts-file, not --class-id")
        prompts = list(args.prompt or [])
        if args.prompts_file:
            with open(args.prompts_file) as f:
                prompts += [line.strip() for line in f if line.strip()]
        if not prompts:  # default: unseen captions of the built-in shapes
            if meta["data"] != "builtin":
                raise UserError("this DiT was trained on your own data: pass --prompt or --prompts-file")
            prompts = ShapesDataset(8, 8, seed=UNSEEN_SEED).captions
        return [None] * len(prompts), prompts, prompts, {}
    if args.prompt or args.prompts_file:
        raise UserError(f"{args.dit} is a class-conditional DiT; pass --class-id, not --prompt")
    classes = args.class_id if args.class_id is not None else list(range(min(8, meta["num_classes"])))
    bad = [c for c in classes if not 0 <= c < meta["num_classes"]]
    if bad:
        raise UserError(f"--class-id {bad[0]} is outside this DiT's classes 0..{meta['num_classes'] - 1}")
    # The DiT never sees text here, but a text-conditioned detokenizer still needs a caption: the paper
    # decodes each class-conditional sample with an unseen caption of its class, so no training
    # caption leaks into the evaluation.
    if tok_text and args.class_captions is None and meta["data"] != "builtin":
        raise UserError("a class-conditional DiT on a text-conditioned tokenizer needs unseen captions per "
                        "class for decoding: pass --class-captions FILE.jsonl ({label, caption} lines)")
    pool = (load_class_captions(args.class_captions) if args.class_captions
            else builtin_class_captions() if tok_text else {})
    missing = [c for c in classes if tok_text and not pool.get(c)]
    if missing:
        raise UserError(f"no captions for class {missing[0]} in {args.class_captions or 'the built-in list'}")
    return classes, [None] * len(classes), [None] * len(classes), pool


def write_npz(path, parts, every, t2i):
    """The ADM-style .npz eval_fid.py reads: arr_0, uint8 (K, H, W, 3), the image arrays `parts` one
    after another (one per rank, memory-mapped files), plus the prompts (what eval_fid.py's CLIP score
    compares against) or labels, one per image. Written as np.savez writes one (a zip of .npy files),
    but arr_0 a few images at a time (50,000 at 256 px are 9.8 GB), and atomically: a killed run never
    leaves half a file."""
    shape = (sum(len(part) for part in parts), *parts[0].shape[1:])
    extra = {"prompts": np.array([c[1] for c in every])} if t2i else {"labels": np.array([c[0] for c in every])}

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as z:  # stored, not compressed: np.savez's zip
            with z.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for part in parts:
                    for i in range(0, len(part), 256):
                        f.write(np.ascontiguousarray(part[i:i + 256]).tobytes())
            for name, arr in extra.items():
                with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, arr)
    atomic_write(path, write)
    print(f"wrote {shape[0]} images {shape[1:]} uint8 to {path}")


def main(argv=None):
    args = get_args(argv)
    with distributed() as (rank, world, device):  # the same torchrun handling as training
        dit, meta = load_dit(args.dit, device)
        tok = load_tokenizer(args.tokenizer or meta["tokenizer"], meta, device)
        t2i = dit.cfg.cond == "text"
        tok_text = tok.cfg.cond == "text" and tok.cfg.text_in != "none"  # the detokenizer reads a caption
        # Prompts are encoded per batch, not cached as in training: the batch then goes through the DiT
        # --steps times, doubled for the guidance, so one encoder pass is a small share of its cost.
        # It is the encoder the DiT's caption cache was made with (meta), or the embeddings would not fit.
        encoder = TextEncoder(meta["text_encoder"], meta["text_len"], device) if t2i or tok_text else None
        labels, prompts, dec_captions, pool = plan_rows(args, meta, t2i, tok_text)
        rng = np.random.default_rng(args.seed)  # which unseen caption of its class a sample decodes with
        amp = autocast(device)  # bf16 on CUDA, as in training

        def conditions(n_per):
            """Row-major (label, DiT prompt, decoding caption) for n_per samples of each row."""
            out = []
            for row in range(len(labels)):
                for _ in range(n_per):
                    cap = dec_captions[row]
                    if not t2i and tok_text:  # an unseen caption of this class for each sample
                        cap = pool[labels[row]][rng.integers(len(pool[labels[row]]))]
                    out.append((labels[row], prompts[row], cap))
            return out

        def draw(items, seed, start=0):
            """Images for a list of conditions, in batches -> uint8 (n, H, W, 3). The batch at row i of
            all the rows drawn (items begin at row `start`) takes its noise from (seed, i): a sample does
            not depend on what else is drawn, nor on which rank draws it."""
            images = []
            for i in tqdm(range(start, start + len(items), args.batch_size), desc="sampling", disable=rank != 0,
                          unit="batch"):
                chunk = items[i - start:i - start + args.batch_size]
                y = torch.tensor([c[0] for c in chunk], device=device) if not t2i else None  # (b,)
                text = mask = dec = dec_mask = None
                if t2i:
                    text, mask = (v.to(device) for v in encoder([c[1] for c in chunk]))  # (b, Lt, Dt), (b, Lt)
                if tok_text:  # T2I decodes with the prompt itself: its embeddings are already here
                    dec, dec_mask = (text, mask) if t2i else (v.to(device) for v in encoder([c[2] for c in chunk]))
                g = torch.Generator().manual_seed(seed * 1_000_003 + i)
                x = generate(dit, tok, meta, y, text, mask, dec, dec_mask, args.cfg_scale, args.steps, args.sampler,
                             args.eta, g, device, amp)  # (b, 3, H, W)
                images.append(to_uint8(x))
            # A rank dealt no conditions (more ranks than batches) still writes its part, empty.
            size = tok.cfg.image_size
            return np.concatenate(images) if images else np.zeros((0, size, size, 3), np.uint8)

        out_dir = os.path.dirname(os.path.abspath(args.dit.rstrip("/")))  # next to the checkpoint or folder
        if args.num_samples > 0:
            # ---- an .npz of K images for eval_fid.py, each rank drawing a run of whole batches ----
            # ADM's format (arr_0, uint8 NHWC), so the ADM suite and eval_fid.py read the same file; FID is
            # only comparable at one count (the paper: 50,000).
            every = conditions(-(-args.num_samples // len(labels)))[:args.num_samples]  # cycles through the rows evenly
            path = args.out or os.path.join(out_dir, f"samples-{args.num_samples}.npz")
            rows = share(len(every), args.batch_size, rank, world)  # the batches one process draws: the same file
            check_shared(rank, {"--out": os.path.dirname(os.path.abspath(path))})  # rank 0 reads every rank's part
            hand = Handoff(path, rank, world, "sampling")  # made here, where the ranks are together (a broadcast)
            with hand:
                images = draw(every[rows.start:rows.stop], args.seed * 1000, rows.start)  # (n, H, W, 3) uint8
                if world == 1:
                    write_npz(path, [images], every, t2i)
                else:
                    # Each rank's images go to a file of its own, never over the process group (all of them
                    # to every rank would be 9.8 GB each at 50,000 x 256 px); rank 0 joins them in order.
                    parts = [f"{path}.part-{r}-of-{world}.npy" for r in range(world)]
                    write_arrays(parts[rank], images)
                    if rank == 0:
                        del images
                        hand.gather()
                        write_npz(path, [np.load(p, mmap_mode="r") for p in parts], every, t2i)
                        for p in parts:
                            os.remove(p)
                    else:
                        hand.send()
        elif rank == 0:
            # ---- a PNG grid: one row per prompt / class, listed in a .txt beside it ----
            items = conditions(args.per_row)
            images = draw(items, args.seed)  # (rows * per_row, H, W, 3) uint8
            imgs = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # back to [-1, 1] for the grid
            path = args.out or os.path.join(out_dir, "samples.png")
            save_grid(path, list(imgs.view(len(labels), args.per_row, *imgs.shape[1:])),
                      captions=prompts if t2i else [f"class {c}" for c in labels])
            print(f"wrote a {len(labels)} x {args.per_row} grid to {path} (rows in {os.path.splitext(path)[0]}.txt)")
            if t2i:  # built-in prompts: does each sample show what its prompt names? (data.prompt_adherence)
                score = prompt_adherence(images, [c[1] for c in items])[0]
                if score == score:  # not NaN: some prompts are built-in captions
                    print(f"prompt adherence {score:.3f} (named background right, each named object's colour in its "
                          f"cell; real images score about 0.99)")


if __name__ == "__main__":
    run_main(main)
