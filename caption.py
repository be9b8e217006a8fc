"""
Captions for image datasets that have none: the paper's first stage (§4.1, Appendix D). TexTok
captions every training image offline with a vision-language model (up to 75 words) and, for
class-conditional generation, keeps unseen captions per class for decoding.

    # caption a folder (flat, or ImageNet-style class folders) into train.py's caption file
    python caption.py /data/imagenet/train --out captions.jsonl --model HuggingFaceTB/SmolVLM-256M-Instruct
    # many GPUs: each rank captions its share, rank 0 merges (waiting on files: ranks end hours apart)
    torchrun --nproc_per_node=8 caption.py /data/imagenet/train --out captions.jsonl
    # many machines: one shard each, then merge
    python caption.py /data/imagenet/train --out captions.jsonl --shard 3/16
    python caption.py /data/imagenet/train --out captions.jsonl --merge
    # hold out captions per class for sample.py (never trained on)
    python caption.py --holdout captions.jsonl --fraction 0.02

Any model that `transformers` loads with AutoModelForImageTextToText works. Chat models
(SmolVLM, Qwen2-VL, ...) get the instruction "describe in at most N words"; captioning models
without a chat template (BLIP, GIT) caption directly. Captions are cut to --max-words either way.

Output, one JSON object per image, appended as batches finish (so a rerun resumes):
    {"file": "n01440764/n01440764_10026.JPEG", "caption": "...", "label": 0}
`label` is the class folder's index in sorted order (what data.py assigns), absent for a flat folder.
"""
import argparse
import glob
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from data import IMAGE_EXTS, class_labels, folder_labels, list_images, load_rgb, read_jsonl
from devices import Handoff, check_shared, distributed
from files import MissingFile, UserError, check_output, check_ranges, first_line, flag_error, run_main, write_jsonl

# What a chat VLM is asked. The paper's captions (Gemini 1.5 Flash, §4.1) are "detailed", up to 75
# words; more descriptive captions reconstruct better (Table 4a), so the prompt asks for the
# objects, their colours, textures and positions, and the background: what a tokenizer can use.
PROMPT = ("Describe this image in detail in at most {n} words: the main objects, their colours, textures "
          "and positions, and the background. Answer with the description only.")

#################################################################################
#                                   Files                                       #
#################################################################################


def find_images(root):
    """Relative paths of every image under root, sorted, and their labels (class folder index, or
    None per file for a flat folder): the same listing and labels as data.CaptionedImages."""
    if not os.path.isdir(root):
        raise MissingFile(f"image folder {root} does not exist; fix the DATA argument")
    files = list_images(root)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_EXTS)}) under {root}")
    return files, folder_labels(files) or [None] * len(files)


def read_rows(path):
    """The rows of a caption file this script wrote (none if there is no file yet). A last line
    cut off by a kill (no newline, not JSON) is first dropped from the file; complete lines are
    never dropped. A line that does not read (data.read_jsonl) or names no file is one line, path:line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is a partial line, or a complete one
    if keep < len(data):         # that an editor saved without its final newline: only the first is dropped
        try:
            json.loads(data[keep:].decode("utf-8-sig"))
            complete = True
        except ValueError:  # not JSON, or not UTF-8 (a character cut in two)
            complete = False
        with open(path, "r+b") as f:
            if complete:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")  # so that the next caption appended starts a line of its own
            else:
                f.truncate(keep)
    rows = []
    for n, r, problem in read_jsonl(path):
        if problem is None and not isinstance(r.get("file"), str):
            problem = f"{path}:{n}: no 'file'"
        if problem is not None:
            raise UserError(f"{problem}; fix or delete that line (an image without a line is captioned again)")
        rows.append(r)
    return rows


def merge(out, parts):
    """Writes the union of caption files `parts` (and `out` itself if it exists) into `out`,
    sorted by file, each image once; atomic."""
    rows = {}
    for p in [out, *parts]:
        for r in read_rows(p):
            rows.setdefault(r["file"], r)  # the first file wins: `out` first, so a merged caption never changes
    write_jsonl(out, [rows[k] for k in sorted(rows)])
    return len(rows)


def truncate_words(text, n):
    """At most n words, whitespace collapsed: the paper's limit is in words (75), not tokens."""
    return " ".join(text.split()[:n])


#################################################################################
#                                The captioner                                  #
#################################################################################

def load_vlm(name, dtype):
    """
    (processor, model) of a vision-language model: from a local folder or the Hugging Face
    cache first, without the network; else, online, from the hub once one short request has
    shown that it is reachable and has the model. (Asked straight away, transformers looks for
    each of a dozen files in turn and retries each one: 2.5 minutes before it gives up offline.)
    """
    import huggingface_hub
    import huggingface_hub.constants
    from huggingface_hub.errors import RepositoryNotFoundError
    from transformers import AutoModelForImageTextToText, AutoProcessor
    fix = ("pass --model with a local folder or a Hugging Face name that AutoModelForImageTextToText loads, e.g. "
           "HuggingFaceTB/SmolVLM-256M-Instruct or Salesforce/blip-image-captioning-large")

    def load(**where):
        return (AutoProcessor.from_pretrained(name, **where),
                AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, **where))
    try:
        return load(local_files_only=True)
    except Exception as e:
        if os.path.isdir(name):
            raise MissingFile(f"the vision-language model in {name} does not load ({first_line(e)}); {fix}") from None
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise MissingFile(f"vision-language model {name!r} is not in the local Hugging Face cache, and the hub is "
                          f"offline (HF_HUB_OFFLINE=1): fetch it once online, or {fix}")
    try:
        huggingface_hub.model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise MissingFile(f"no vision-language model {name!r} on the Hugging Face hub (or it is private); {fix}") from None
    except Exception as e:  # no network, a proxy, a timeout
        raise MissingFile(f"vision-language model {name!r} is not in the local Hugging Face cache, and the hub is "
                          f"unreachable ({first_line(e)}): fetch it once online, or {fix}") from None
    try:
        return load()
    except Exception as e:
        raise MissingFile(f"could not load the vision-language model {name!r} ({first_line(e)}); {fix}") from None


class Captioner:
    """A Hugging Face vision-language model that turns a batch of PIL images into captions."""

    def __init__(self, name, max_words=75, device="cpu"):
        self.device, self.max_words = torch.device(device), max_words
        # bf16 on CUDA, as the rest of the project runs there; fp32 on the CPU, where bf16 is slower.
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.processor, model = load_vlm(name, dtype)
        self.model = model.to(self.device).eval()
        self.chat = getattr(self.processor, "chat_template", None) is not None
        tok = getattr(self.processor, "tokenizer", None)
        if self.chat and tok is not None:
            tok.padding_side = "left"  # decoder-only generation continues from the right edge

    @torch.no_grad()
    def __call__(self, images):
        """A list of PIL images -> one caption each, decoded greedily (no sampling noise in them)."""
        if self.chat:
            messages = [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": PROMPT.format(n=self.max_words)}]}]
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = self.processor(text=[prompt] * len(images), images=[[im] for im in images],
                                    return_tensors="pt", padding=True)
        else:  # a captioning model: the image alone
            inputs = self.processor(images=images, return_tensors="pt")
        inputs = {k: (v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        # About 1.3 tokens per English word; the margin is cut off by truncate_words anyway.
        out = self.model.generate(**inputs, max_new_tokens=2 * self.max_words + 8, do_sample=False)
        if self.chat:  # decoder-only: the output repeats the prompt, keep only what follows it
            out = out[:, inputs["input_ids"].shape[1]:]
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [truncate_words(t, self.max_words) for t in texts]


#################################################################################
#                                   Commands                                    #
#################################################################################

def caption_folder(args, rank=0, world=1, device=None):
    """Captions this process's share of --data (--shard i/n, else its torchrun rank's) into its
    own file, appended batch by batch: a rerun skips what is already there (read_rows), and an
    unreadable image is skipped and counted, never fatal. -> (the file, images skipped)."""
    files, labels = find_images(args.data)
    if args.shard:
        i, n = args.shard
    else:
        i, n = rank, world
    path = args.out if n == 1 else f"{args.out}.shard-{i}-of-{n}"  # one writer per file
    mine = list(range(len(files)))[i::n]  # every n-th image: shards of nearly equal size
    done = {r["file"] for r in read_rows(path)}
    todo = [k for k in mine if files[k] not in done]
    captioner = Captioner(args.model, args.max_words, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bad = []
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"captioning (shard {i}/{n})", unit="img")
    t0, count = time.time(), 0
    # Appended, never rewritten: a kill loses at most the line being written, which read_rows drops.
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for b in range(0, len(todo), args.batch_size):
            batch, images = [], []
            for k in todo[b:b + args.batch_size]:
                try:
                    images.append(load_rgb(os.path.join(args.data, files[k])))
                    batch.append(k)
                except Exception as e:
                    bad.append(f"{os.path.join(args.data, files[k])} ({e.__class__.__name__})")
            for k, text in zip(batch, captioner(images) if images else []):
                row = {"file": files[k], "caption": text}
                if labels[k] is not None:
                    row["label"] = labels[k]
                f.write(json.dumps(row) + "\n")
            f.flush()  # a finished batch is on disk before the next starts
            count += len(batch)
            bar.update(len(todo[b:b + args.batch_size]))
            bar.set_postfix(img_s=f"{count / (time.time() - t0):.1f}", skipped=len(bad))
    bar.close()
    if bad:
        print(f"skipped {len(bad)} unreadable image(s), e.g. {bad[0]}")
    return path, len(bad)


def holdout(path, fraction, seed=0):
    """Splits a labelled caption file into <name>-train.jsonl (train.py) and <name>-unseen.jsonl
    ({label, caption} per line, for sample.py --class-captions): `fraction` of each class's
    captions, at least one, are held out and never trained on."""
    if not os.path.isfile(path):
        raise MissingFile(f"caption file {path} not found; fix --holdout")
    rows, lines = [], []
    for n, r, problem in read_jsonl(path):
        if problem is None and "label" not in r:
            problem = f"{path}:{n}: no 'label'; holding out captions per class needs class labels"
        if problem is not None:
            raise UserError(problem)
        rows.append(r)
        lines.append(n)
    # Numbered as train.py numbers the labels of this file (data.class_labels): the unseen file holds the
    # class numbers the DiT is trained with, which sample.py --class-captions takes.
    labels, names = class_labels([r["label"] for r in rows], [f"{path}:{n}" for n in lines], check_range=False)
    if labels is None:
        raise UserError(f"{path}: every 'label' is null; holding out captions per class needs class labels")
    rng = np.random.default_rng(seed)  # the same split for the same file and seed
    by_class = {}
    for k, label in enumerate(labels):
        by_class.setdefault(label, []).append(k)
    unseen = set()
    for label, ks in by_class.items():
        if len(ks) < 2:
            raise UserError(f"{path}: class {names[label] if names else label} has {len(ks)} caption(s); holding one "
                            f"out would leave none to train on")
        take = min(len(ks) - 1, max(1, round(fraction * len(ks))))  # at least one held out, one left
        unseen.update(rng.choice(ks, size=take, replace=False).tolist())
    stem = os.path.splitext(path)[0]
    train_path, unseen_path = f"{stem}-train.jsonl", f"{stem}-unseen.jsonl"
    write_jsonl(train_path, [r for k, r in enumerate(rows) if k not in unseen])
    write_jsonl(unseen_path, [{"label": labels[k], **({"class": names[labels[k]]} if names else {}),
                               "caption": rows[k]["caption"]} for k in sorted(unseen)])
    return train_path, unseen_path, len(unseen)


def get_args(argv=None):
    """The flags of the three commands (see the top); sizes below 1 and a --fraction outside (0, 1)
    are refused here, before any model is loaded."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", help="image folder to caption")
    p.add_argument("--out", default="captions.jsonl", help="caption file to write (appended to, so reruns resume)")
    p.add_argument("--model", default="HuggingFaceTB/SmolVLM-256M-Instruct", help="hub name or local folder")
    p.add_argument("--max-words", type=int, default=75, help="caption length limit (paper: 75)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard", default=None, help="i/n: caption every n-th image from the i-th (several machines)")
    p.add_argument("--merge", action="store_true", help="merge <out>.shard-* files into <out>")
    p.add_argument("--holdout", default=None, metavar="CAPTIONS", help="split a labelled caption file (see top)")
    p.add_argument("--fraction", type=float, default=0.02, help="share of each class's captions to hold out")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    check_ranges(p, args, at_least_1=("max_words", "batch_size"), not_negative=("seed",))
    if args.shard:
        i, slash, n = args.shard.partition("/")
        if not (slash and i.isdigit() and n.isdigit() and int(i) < int(n)):
            flag_error(p, f"--shard {args.shard}: expected i/n with 0 <= i < n, e.g. 0/4")
        args.shard = int(i), int(n)
    if not 0 < args.fraction < 1:
        flag_error(p, f"--fraction {args.fraction}: must be between 0 and 1")
    check_output(p, "--out", args.out)
    return args


def main(argv=None):
    """One of three commands: --holdout splits a caption file; --merge joins shard files; else
    caption --data (one process, one --shard, or every torchrun rank, merged by rank 0)."""
    args = get_args(argv)
    if args.holdout:
        train_path, unseen_path, n = holdout(args.holdout, args.fraction, args.seed)
        print(f"held out {n} caption(s) into {unseen_path} (for sample.py --class-captions); train on {train_path}")
        return
    if args.data is None:
        raise UserError("pass the image folder to caption (or --holdout CAPTIONS)")
    if args.merge:
        n = merge(args.out, sorted(glob.glob(args.out + ".shard-*-of-*")))
        print(f"merged into {args.out}: {n} captions")
        return
    if args.shard:  # one machine's share, by hand: every process is on its own, no process group
        path, _ = caption_folder(args)
        print(f"captions: {path}  (merge the shards with: python caption.py {args.data} --out {args.out} --merge)")
        return
    with distributed() as (rank, world, device):  # under torchrun each rank captions its share
        check_shared(rank, {"--out": os.path.dirname(os.path.abspath(args.out))})  # rank 0 merges every rank's file
        # Ranks finish hours apart (images differ in cost, a rank may resume a half-done shard): each one
        # leaves as soon as its file is complete, and rank 0 waits for their notes on files, not in a barrier.
        with Handoff(args.out, rank, world, "captioning") as hand:
            path, _ = caption_folder(args, rank, world, device)
            if world == 1:
                print(f"captions: {path}")
            elif rank > 0:
                hand.send()
            else:
                hand.gather()
                n = merge(args.out, [f"{args.out}.shard-{r}-of-{world}" for r in range(world)])
                print(f"merged {world} rank files into {args.out}: {n} captions")


if __name__ == "__main__":
    run_main(main)
