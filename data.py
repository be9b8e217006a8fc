"""
Datasets shared by train.py, sample.py and eval_fid.py.

    ShapesDataset       the built-in captioned dataset: procedural images of coloured shapes whose
                        captions name each object's size, colour, shape and place, and the
                        background, but not the exact positions, rotations, shades or the
                        background's gradient. Deterministic by seed, any resolution, no download.
    CaptionedImages     real data: an image folder (flat or ImageNet-style class folders) plus a
                        JSON-lines caption file  {"file": ..., "caption": ..., "label": ...}.
    ShardImages         real data as webdataset shards (KEY.jpg + KEY.txt, + KEY.cls), and
    ParquetImages       as Parquet (an image column, a caption column): indexed, read on demand
                        (open_dataset picks the format behind --data; docs/data-formats.md)

Both return (image (3, H, W) float in [-1, 1], index, label (-1: none)). Captions live in
`.captions` and labels in `.labels` (None when there are no classes), so the text encoder runs
over them once (train.py caches the embeddings) and never per step.

    class_labels        a caption file's labels as class numbers, checked: every script numbers
                        classes here (numbers keep theirs, class names in sorted order)
    prompt_adherence    does an image show what its built-in caption says (colours by cell):
                        the built-in shapes' text-to-image score
    fetch_text          rows of train.py's caption-embedding cache as a batch's (text, mask)
    make_loader         train.py's training loader: the caption rows read with the images, in
                        workers that persist across epochs, pinned for the copy to the GPU
    LatentSet           train.py's cache of DiT latents, batched as an image dataset is
    write_shards        any real dataset as resized shards (python data.py shards --data ... --out ...)
"""
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from files import MissingFile, UserError, atomic_write, file_digest, first_line, json_digest

#################################################################################
#                          The built-in captioned dataset                       #
#################################################################################

COLORS = {  # name -> RGB
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (130, 50, 170), "orange": (245, 135, 25), "cyan": (40, 200, 210), "pink": (245, 140, 190),
    "white": (245, 245, 245), "black": (25, 25, 25), "brown": (125, 75, 35), "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
# Shape diameter as a fraction of its cell: a small shape is 5 px at 32 px (a cell is 10.7 px). At
# 0.4 / 0.62 / 0.85 a text model drew what its caption names more slowly (docs/design-notes.md, "The built-in
# dataset").
SIZES = {"small": 0.5, "medium": 0.7, "large": 0.9}
PLACES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
SUPERSAMPLE = 128  # shapes are drawn at >= this many pixels, then downsampled (anti-aliasing)


def _polygon(shape, cx, cy, r, angle):
    """Vertices of a shape of radius r centred at (cx, cy), rotated by angle (radians)."""
    if shape == "square":
        s = 0.625 * r  # half the side: a square a little smaller than the circle of radius r
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    elif shape == "diamond":
        pts = [(0.7 * r * math.cos(a), r * math.sin(a)) for a in np.arange(4) * math.pi / 2]
    elif shape == "star":
        pts = [((r if k % 2 == 0 else 0.45 * r) * math.cos(a), (r if k % 2 == 0 else 0.45 * r) * math.sin(a))
               for k, a in enumerate(np.arange(10) * math.pi / 5 - math.pi / 2)]
    elif shape == "cross":
        t = 0.33 * r
        pts = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t)]
    else:
        raise ValueError(shape)
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def make_scene(index: int, seed: int = 0):
    """The random description of image `index`: background, gradient, objects. Pure function of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    names = list(COLORS)
    bg = names[rng.integers(len(names))]
    # 1 or 2 objects, each in its own cell of a 3x3 grid. With 1 to 4, captions ran to ~45 text
    # tokens, most of a TexTok-T step's compute (docs/design-notes.md, "The built-in dataset").
    n = int(rng.integers(1, 3))
    cells = rng.choice(9, size=n, replace=False)
    objects = []
    for cell in cells:
        color = names[rng.choice([i for i in range(len(names)) if names[i] != bg])]
        size = list(SIZES)[rng.integers(3)]
        objects.append(dict(
            shape=SHAPES[rng.integers(len(SHAPES))], color=color, size=size, place=PLACES[cell], cell=int(cell),
            # Left out of the caption, so the image tokens still have work to do:
            jitter=rng.uniform(-1, 1, size=2) * (1 - SIZES[size]) / 2,  # where in its cell
            angle=float(rng.uniform(0, 2 * math.pi)), shade=float(rng.uniform(0.88, 1.12))))
    gradient = dict(angle=float(rng.uniform(0, 2 * math.pi)), amount=float(rng.uniform(0.0, 0.35)))
    return dict(background=bg, objects=objects, gradient=gradient)


# How much a built-in caption says (train.py and reproduce.py --builtin-captions): all it names, or
# less, with the images unchanged. The caption's worth against what it says about appearance that the
# tokens must otherwise hold (issue 24): the colours, the places, or nothing but the shapes' names.
CAPTION_DETAILS = ("full", "no-colors", "no-places", "shapes")


def caption_of(scene, detail: str = "full") -> str:
    """'a large red circle at the top left and a small blue star in the center, on a gray background'
    ("full"); without the colours 'a large circle at the top left and a small star in the center';
    without the places 'a large red circle and a small blue star, on a gray background'; "shapes":
    'a circle and a star'."""
    if detail not in CAPTION_DETAILS:
        raise ValueError(f"caption detail {detail!r}: one of {', '.join(CAPTION_DETAILS)}")
    colors, places = detail in ("full", "no-places"), detail in ("full", "no-colors")
    parts = []
    for o in scene["objects"]:
        words = [o["shape"]] if detail == "shapes" else [o["size"], *([o["color"]] if colors else []), o["shape"]]
        place = f" {'in' if o['place'] == 'center' else 'at'} the {o['place']}" if places else ""
        parts.append(f"a {' '.join(words)}{place}")
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    bg = scene["background"]
    return f"{text}, on {'an' if bg[0] in 'aeiou' else 'a'} {bg} background" if colors else text


def scene_of(caption: str):
    """The inverse of caption_of, for what a caption says: {background, objects: [{size, color,
    shape, place, cell}]}, or None for a caption outside the built-in grammar (a prompt of your own
    may use it too: "a large red circle at the top left, on a blue background")."""
    import re
    word = lambda names: "|".join(sorted(names, key=len, reverse=True))  # longest first: "top left" before "top"
    obj = re.compile(rf"a ({word(SIZES)}) ({word(COLORS)}) ({word(SHAPES)}) (?:at|in) the ({word(PLACES)})$")
    m = re.fullmatch(rf"(.+), on an? ({word(COLORS)}) background", caption.strip().lower())
    if m is None:
        return None
    objects = []
    for part in re.split(r", | and ", m.group(1)):
        o = obj.match(part)
        if o is None:
            return None
        objects.append(dict(size=o[1], color=o[2], shape=o[3], place=o[4], cell=PLACES.index(o[4])))
    return dict(background=m.group(2), objects=objects)


def render_caption(caption: str, size: int, seed: int = 0) -> Image.Image:
    """A picture of what a built-in caption says, with what it leaves out (where in its cell
    each object sits, its rotation and shade, the background's gradient) drawn at random as
    make_scene draws them: real images for a prompt, as a reference for generated ones."""
    scene = scene_of(caption)
    if scene is None:
        raise ValueError(f"not a caption of the built-in shapes: {caption!r}")
    rng = np.random.default_rng(seed)
    for o in scene["objects"]:
        o.update(jitter=rng.uniform(-1, 1, size=2) * (1 - SIZES[o["size"]]) / 2, angle=float(rng.uniform(0, 2 * math.pi)),
                 shade=float(rng.uniform(0.88, 1.12)))
    scene["gradient"] = dict(angle=float(rng.uniform(0, 2 * math.pi)), amount=float(rng.uniform(0.0, 0.35)))
    return render(scene, size)


def render(scene, size: int) -> Image.Image:
    """Draws a scene at size x size pixels (supersampled, then box-filtered down)."""
    S = size * max(1, math.ceil(SUPERSAMPLE / size))
    # Background: its named colour, lightened/darkened along a random direction (not captioned).
    base = np.array(COLORS[scene["background"]], dtype=np.float32)
    g = scene["gradient"]
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S - 0.5
    ramp = (xx * math.cos(g["angle"]) + yy * math.sin(g["angle"])) * g["amount"]  # in [-0.25, 0.25]
    img = base + ramp[..., None] * np.where(base > 127, -255.0, 255.0) * 0.5
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    cell = S / 3
    for o in scene["objects"]:
        row, col = divmod(o["cell"], 3)
        cx = (col + 0.5 + o["jitter"][0]) * cell
        cy = (row + 0.5 + o["jitter"][1]) * cell
        r = SIZES[o["size"]] * cell / 2
        color = tuple(int(min(255, c * o["shade"])) for c in COLORS[o["color"]])
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            draw.polygon(_polygon(o["shape"], cx, cy, r, o["angle"]), fill=color)
    return canvas.resize((size, size), Image.BOX) if S != size else canvas


def prompt_adherence(images, captions, min_share=0.03):
    """
    Does each image show what its built-in caption says? The text-to-image score on the built-in
    shapes (train.py --stage dit logs it, sample.py prints it, eval_fid.py adherence reports it
    beside real images'). Every pixel is labelled with its nearest named colour (COLORS). The
    background counts as right when the most common label over the cells the caption leaves empty
    is the named background colour; an object, when at least `min_share` of the pixels of its
    named cell (of the 3x3 grid) carry its colour (a small star at 32 px covers about 7% of its
    cell). An image's score is the share of its checks (background + each object) that pass.
    Returns (mean score, per-image scores); captions outside the built-in grammar (scene_of) are
    skipped, with NaN as their score.
    """
    palette = np.array(list(COLORS.values()), np.float32)  # (12, 3)
    names = list(COLORS)
    scores = []
    for img, caption in zip(images, captions):
        scene = scene_of(str(caption))
        if scene is None:
            scores.append(float("nan"))
            continue
        H, W, _ = img.shape
        dist = ((img.astype(np.float32)[:, :, None, :] - palette) ** 2).sum(-1)  # (H, W, 12)
        label = dist.argmin(-1)  # (H, W): index of the nearest named colour
        rows, cols = np.arange(H) * 3 // H, np.arange(W) * 3 // W  # each pixel's cell row and column
        cell = rows[:, None] * 3 + cols[None, :]  # (H, W) in 0..8, raster order as data.PLACES
        used = {o["cell"] for o in scene["objects"]}
        empty = np.isin(cell, [c for c in range(9) if c not in used])
        checks = [np.bincount(label[empty], minlength=len(names)).argmax() == names.index(scene["background"])]
        for o in scene["objects"]:
            checks.append((label[cell == o["cell"]] == names.index(o["color"])).mean() >= min_share)
        scores.append(float(np.mean(checks)))
    scores = np.array(scores)
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan"), scores


def to_tensor(img) -> torch.Tensor:
    """PIL RGB, or its (H, W, 3) uint8 array -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ShapesDataset(torch.utils.data.Dataset):
    """The built-in captioned dataset; image i is a pure function of (seed, i). Drawn per item, or,
    with a cache_dir (train.py's --cache-dir), drawn once into a memory-mapped uint8 array there
    and read back: at about a millisecond an image a GPU would otherwise wait for the drawing.
    `detail` is how much the captions say (CAPTION_DETAILS); the images are the same for every one."""

    def __init__(self, num_images: int = 10000, image_size: int = 32, seed: int = 0, cache_dir: str = None,
                 detail: str = "full"):
        self.num_images, self.image_size, self.seed = num_images, image_size, seed
        self.scenes = [make_scene(i, seed) for i in range(num_images)]
        self.captions = [caption_of(s, detail) for s in self.scenes]
        # A class label, for the class-conditional paths (DiT, the class-embedding ablation):
        # the shape of the first object, as ImageNet's class is the main object (6 classes).
        self.labels = [SHAPES.index(s["objects"][0]["shape"]) for s in self.scenes]
        self.pixels = None if cache_dir is None else MappedArray(self.draw_once(cache_dir))

    def draw_once(self, cache_dir):
        """The path of every image drawn, (n, H, W, 3) uint8 .npy, drawn now unless a run drew it before.
        Keyed by the set's size, resolution and seed and by this file's bytes: a change to the drawing
        code draws again rather than read pictures it would no longer draw."""
        from tqdm import tqdm
        key = json_digest([self.num_images, self.image_size, self.seed, file_digest(__file__)])[:16]
        path = os.path.join(cache_dir, f"shapes-{key}.npy")
        if os.path.isfile(path):
            return path

        def draw_into(tmp):
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                            shape=(self.num_images, self.image_size, self.image_size, 3))
            for i, scene in enumerate(tqdm(self.scenes, desc="drawing the built-in set", unit="img", leave=False)):
                out[i] = np.asarray(render(scene, self.image_size))
            out.flush()
        atomic_write(path, draw_into, shared=True)  # two runs may draw it at once: each writes its own file
        return path

    def __len__(self):
        return self.num_images

    def __getitem__(self, i):
        # Drawn once: the uint8 pixels render() gives, hence the same tensor as drawing it now.
        image = self.pixels[i] if self.pixels is not None else render(self.scenes[i], self.image_size)
        return to_tensor(image), i, self.labels[i]


class MappedArray:
    """A .npy file, memory-mapped on first use in each process and indexed as the array. It pickles
    as its path: a DataLoader worker that is spawned, not forked (macOS, Windows), maps the file
    itself, where a pickled np.memmap would arrive as a copy of the whole array."""

    def __init__(self, path, array=None):
        self.path, self._array = path, array

    @classmethod
    def of(cls, a):
        """`a` as a MappedArray when it is a memory map (np.load(..., mmap_mode="r")), else `a`."""
        return cls(a.filename, a) if isinstance(a, np.memmap) else a

    def __getitem__(self, i):
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array[i]

    def __getstate__(self):
        return {"path": self.path, "_array": None}


#################################################################################
#                         Real data: folder + caption file                      #
#################################################################################

def center_crop(img: Image.Image, size: int) -> Image.Image:
    """ADM's preprocessing (Dhariwal & Nichol 2021): halve with a box filter while the short side
    is >= 2x the target, resize the short side to `size` with bicubic, then crop the centre."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top:top + size, left:left + size])


def to_8bit(arr: np.ndarray) -> np.ndarray:
    """A 16-bit, 32-bit or float grayscale image as 8 bits, scaled to its range (PIL's own
    conversion clips at 255, which turns a 16-bit photo white and a [0, 1] float one black).
    Integers are read as 16-bit (0..65535, how PIL opens 16-bit files); floats as [0, 1] when they
    lie there, else stretched from their minimum to their maximum (a float image has no fixed range)."""
    if arr.dtype.kind in "iu":
        return (np.clip(arr, 0, 65535).astype(np.float64) / 257).round().astype(np.uint8)  # 65535 / 257 = 255
    arr = np.nan_to_num(arr.astype(np.float64))
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi > 1:
        arr = (arr - lo) / max(hi - lo, 1e-12)
    return (arr * 255).round().astype(np.uint8)


def load_rgb(path: str, draft=None) -> Image.Image:
    """Opens and fully decodes any image as 8-bit RGB: grayscale and palette are converted,
    transparency goes onto white, 16-bit and float images are scaled (to_8bit). draft=(w, h) lets
    a JPEG decode at a reduced scale still at least that large: it reads every byte all the same,
    so the upfront check (CaptionedImages) catches a truncated file at a fraction of the cost."""
    img = Image.open(path)
    if draft:
        img.draft("RGB", draft)
    img.load()  # decode now: a truncated file fails here, not later inside a DataLoader worker
    # A camera stores a photo as its sensor saw it and says in EXIF how to turn it upright; every
    # script reads images here, so training, captioning and evaluation all see it upright.
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = Image.fromarray(to_8bit(np.asarray(img)))  # mode L, converted to RGB below
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def image_problem(path: str, size: int):
    """None when the image at `path` decodes as training will decode it; else, in one line, why not."""
    try:
        load_rgb(path, draft=(size, size))
        return None
    except Exception as e:  # truncated, not an image, an unknown mode, a decompression bomb, ...
        return f"{path}: unreadable image ({first_line(e)})"


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def list_images(root: str) -> list[str]:
    """Paths (relative to root, sorted) of every image file under root, at any depth. Symlinked
    folders are followed (a class folder linked in from elsewhere), each real folder once."""
    seen, out = set(), []
    for d, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:  # a link back up the tree would loop for ever
            dirs[:] = []
            continue
        seen.add(real)
        out += [os.path.relpath(os.path.join(d, name), root) for name in names if name.lower().endswith(IMAGE_EXTS)]
    return sorted(out)


def folder_labels(files: list[str]):
    """ImageNet-style labels: each file's class folder, as its index among the sorted folders;
    None for a flat folder (no classes)."""
    classes = sorted({os.path.dirname(f) for f in files})
    return None if classes == [""] else [classes.index(os.path.dirname(f)) for f in files]


def read_jsonl(path: str):
    """
    (line number, object, problem) for each non-blank line of a JSON-lines file: every caption
    file is read here (train.py's, sample.py's class captions, caption.py's hold-out). `problem`
    (one line, 'path:line: ...') says why a line cannot be used; the object is then None, or, for
    a line that is not UTF-8, its reading with the bad bytes replaced, which tells the caller the
    image it is about. A UTF-8 byte-order mark at a line's start is accepted (editors write one).
    """
    first = True
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig")  # -sig: drops a byte-order mark
            except UnicodeDecodeError as e:
                try:
                    guess = json.loads(raw.decode("utf-8", "replace"))
                except json.JSONDecodeError:
                    guess = None
                yield n, guess, (f"{path}:{n}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                 f"save the file as UTF-8")
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                if first and text.strip() in ("[", "{"):  # the whole file is one (pretty-printed) JSON value
                    raise UserError(f"{path}:{n}: the file is one JSON {'array' if text.strip() == '[' else 'object'} "
                                    f"over many lines; the format is JSON lines: one object per line") from None
                yield n, None, f"{path}:{n}: not JSON ({e.msg} at column {e.colno})"
                continue
            finally:
                first = False
            if not isinstance(obj, dict):
                hint = "; the format is JSON lines: one object per line" if isinstance(obj, list) else ""
                yield n, None, f"{path}:{n}: not a JSON object{hint}"
                continue
            yield n, obj, None


def class_labels(raw: list, where: list[str], check_range: bool = True):
    """
    The labels of a caption file, as given -> (class numbers, class names or None); None for both
    when no line has a label. Every script numbers classes here, alike (train.py, caption.py
    --holdout, sample.py --class-captions): ints, and strings that are integers ("7"), keep their
    number; class names ("dog") are numbered in sorted order (cat 0, dog 1, ...). Refused, naming
    where[i] ('file:line'): a label on some lines only, one that is neither, names mixed with
    numbers, a negative number, and (check_range) a number of 2x the count of distinct labels or
    more: a label of 100000 among 10 classes would build 100000 class embeddings, nearly all unseen.
    """
    if all(v is None for v in raw):
        return None, None
    number = lambda v: (v if isinstance(v, int) and not isinstance(v, bool) else
                        int(v) if isinstance(v, str) and v.strip().lstrip("-").isdigit() else None)
    numbers = [number(v) for v in raw]
    fix = "give every line an int label 0, 1, ... or a class name"
    for v, k, w in zip(raw, numbers, where):
        if v is None:
            first = where[next(i for i, u in enumerate(raw) if u is not None)]
            raise UserError(f"{w}: no 'label', but other lines have one ({first}); {fix}, or none a label")
        if k is None and not (isinstance(v, str) and v.strip()):
            raise UserError(f"{w}: label {v!r} is neither an int nor a class name; {fix}")
    if all(k is None for k in numbers):
        names = sorted({v.strip() for v in raw})
        return [names.index(v.strip()) for v in raw], names
    if any(k is None for k in numbers):
        i, j = numbers.index(None), next(i for i, k in enumerate(numbers) if k is not None)
        raise UserError(f"{where[i]}: label {raw[i]!r} is a class name, but {where[j]} has the number "
                        f"{raw[j]!r}; {fix}, not both")
    for k, w in zip(numbers, where):
        if k < 0:
            raise UserError(f"{w}: label {k} is negative; {fix}")
    distinct, top = len(set(numbers)), max(numbers)
    if check_range and top >= 2 * distinct:
        raise UserError(f"{where[numbers.index(top)]}: label {top} is far beyond the {distinct} distinct label(s) "
                        f"(a model of {top + 1} classes, most never seen); number the classes 0..{distinct - 1}, "
                        f"or give class names")
    return numbers, None


def read_captions(path: str, root: str):
    """
    The caption file of an image folder: ({file: (caption, label or None, line)}, {key: problem}),
    files normalised and relative to `root`. A problem is keyed by its image when the line names
    one, else by its line: a line that does not read, a caption that is null, empty or not text,
    and an image captioned on more than one line (which of them is right? both are dropped).
    """
    records, problems, line_of = {}, {}, {}
    for n, r, problem in read_jsonl(path):
        file = r.get("file") if isinstance(r, dict) else None
        file = os.path.normpath(file) if isinstance(file, str) and file.strip() else None
        if problem is None and file is None:
            problem = f"{path}:{n}: no 'file' (the image's path relative to {root})"
        if problem is None and os.path.isabs(file):
            problem = (f"{path}:{n}: 'file' is an absolute path ({file}); paths are relative to the image folder "
                       f"({root})")
        if problem is not None:
            problems[file or f"{path}:{n}"] = problem
            continue
        caption = r.get("caption")
        where = f"{os.path.join(root, file)}: "
        if file in line_of:
            problems[file] = where + f"captioned on more than one line ({path}:{line_of[file]} and {path}:{n}); keep one"
            records.pop(file, None)
            continue
        line_of[file] = n
        if not isinstance(caption, str) or not caption.strip():
            what = ("no" if "caption" not in r else "null" if caption is None
                    else "empty" if isinstance(caption, str) else f"non-text ({caption!r})")
            problems[file] = where + f"{what} caption ({path}:{n})"
            continue
        records[file] = (caption.strip(), r.get("label"), n)
    return {f: v for f, v in records.items() if f not in problems}, problems  # a bad line for it drops it


def file_stats(paths):
    """[size, modification time in ns] of each file (None for one that is gone): what says that a file
    was replaced, as the caches' keys use it."""
    return [[st.st_size, st.st_mtime_ns] if st else None
            for st in (os.stat(p) if os.path.exists(p) else None for p in paths)]


def checked_once(cache_dir, key, check, progress):
    """
    The decode check of a dataset's images (check() -> {item: one-line problem}), run once: recorded
    in cache_dir under `key` (the files, their sizes and modification times, what is checked), so a
    second start, and under torchrun every rank after the first (train.build_data), reads the record
    instead of decoding every image again. An image replaced or touched since changes the key.
    """
    if cache_dir is None:
        return check()
    path = os.path.join(cache_dir, f"checked-{json_digest(key)[:16]}.json")
    if os.path.isfile(path):
        with open(path) as f:
            found = json.load(f)
        if progress:
            print(f"images decoded and checked by an earlier run ({path}): not decoded again")
        return found
    found = check()

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(found, f)
    atomic_write(path, write, shared=True)  # two runs may check the same data at once
    return found


def skip_or_refuse(problems: dict, skip_bad: bool, progress: bool) -> int:
    """What a dataset does with its bad items ({key: one-line problem}): refuse them, naming the first
    and the count, or with --skip-bad skip them and say so; -> how many were skipped."""
    first = next(iter(problems.values()), None)
    if problems and not skip_bad:
        raise UserError(f"{first}  ({len(problems)} problem(s) in all; fix them, or pass "
                        f"--skip-bad to skip and count them)")
    if problems and progress:
        print(f"skipped {len(problems)} bad item(s), e.g. {first}")
    return len(problems)


class CaptionedImages(torch.utils.data.Dataset):
    """
    Images under `root` with captions from a JSON-lines file: {"file": "n01440764/x.JPEG",
    "caption": "...", "label": 3 or "tench" (optional; numbered by class_labels)}. `file` is
    relative to `root`. With ImageNet-style class folders (root/<class>/<image>) and no "label",
    the label is the class folder's index in sorted order. Bad input (an unreadable image or
    caption line, an image without a caption or with two, a null or empty caption, a caption for
    a missing file) is an error naming the file, or, with skip_bad=True, skipped and counted,
    each image once. With a cache_dir the decode check is recorded there (checked_once).
    """

    def __init__(self, root: str, captions_file: str, image_size: int = 256, skip_bad: bool = False,
                 progress: bool = True, cache_dir: str = None):
        from tqdm import tqdm
        self.root, self.image_size = root, image_size
        if not os.path.isdir(root):
            raise MissingFile(f"image folder {root} does not exist; fix --data")
        if not os.path.isfile(captions_file):
            raise MissingFile(f"caption file {captions_file} does not exist; fix --captions")
        # problems: what is wrong, one entry per image (or per caption line naming no image), so
        # that each bad image is reported, and counted, once.
        records, problems = read_captions(captions_file, root)
        # Numbered once over the whole file (an image skipped never renumbers the classes), before any image is read.
        labels, self.class_names = class_labels([r[1] for r in records.values()],
                                                [f"{captions_file}:{r[2]}" for r in records.values()])
        on_disk = list_images(root)
        on_disk_set = set(on_disk)
        for f in on_disk:
            if f not in records:
                problems.setdefault(f, f"{os.path.join(root, f)}: image has no caption in {captions_file}")
        for f in records:
            if f not in on_disk_set:
                problems[f] = f"{os.path.join(root, f)}: captioned in {captions_file} but not found"
        files = [f for f in on_disk if f in records]

        def check():  # every image decoded once, as training decodes it (threads: PIL decodes without the GIL)
            found = {}
            with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
                checked = pool.map(lambda f: image_problem(os.path.join(root, f), image_size), files)
                for f, problem in zip(files, tqdm(checked, total=len(files), desc="checking images",
                                                  disable=not progress, unit="img")):
                    if problem:
                        found[f] = problem
            return found
        key = ["folder", os.path.abspath(root), image_size, files, file_stats([os.path.join(root, f) for f in files])]
        bad = checked_once(cache_dir, key, check, progress)
        problems.update(bad)
        good = [f for f in files if f not in bad]
        self.skipped = skip_or_refuse(problems, skip_bad, progress)
        if not good:
            raise UserError(f"no usable captioned images under {root} with {captions_file}")
        self.files = good
        self.captions = [records[f][0] for f in good]
        if labels is not None:  # labels given in the file (numbers, or class names: class_labels)
            label_of = dict(zip(records, labels))
        else:  # ImageNet-style class folders (numbered over every folder, as caption.py does), or None
            label_of = dict(zip(on_disk, folder_labels(on_disk) or [None] * len(on_disk)))
        self.labels = None if label_of[good[0]] is None else [label_of[f] for f in good]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = os.path.join(self.root, self.files[i])
        try:
            img = load_rgb(path)
        except Exception as e:  # it decoded when the dataset was built: changed during the run?
            raise UserError(f"{path}: unreadable image ({first_line(e)}), though it decoded when training "
                            f"started; was it changed since?") from None
        return to_tensor(center_crop(img, self.image_size)), i, (self.labels[i] if self.labels is not None else -1)


class Split(torch.utils.data.Dataset):
    """
    Part of a dataset (a train or held-out split): item k is dataset[indices[k]], returned with
    index k rather than the parent's index, so that caches built over this split's `.captions`
    (caption embeddings, DiT latents) line up with what its items say. (torch's Subset passes the
    parent's index through, which would read another image's caption.)
    """

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)
        self.captions = [dataset.captions[i] for i in self.indices]
        self.labels = None if dataset.labels is None else [dataset.labels[i] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        image, _, label = self.dataset[self.indices[k]]
        return image, k, label


def spread_sample(dataset, n: int):
    """`n` items spread evenly over `dataset` (all of it if smaller): the training images an evaluation
    scores beside the held-out ones. Evenly, not the first n: a folder's files are sorted, so its first
    ones are alike (the same class, or the same kind of name)."""
    return Split(dataset, np.linspace(0, len(dataset) - 1, min(n, len(dataset))).astype(int))


def load_splits(data: str = "builtin", captions: str = None, image_size: int = 32, seed: int = 0,
                num_images: int = 4096, val_images: int = 256, skip_bad: bool = False, progress: bool = True,
                caption_key: str = None, image_key: str = None, cache_dir: str = None,
                builtin_captions: str = "full"):
    """
    (training set, held-out set), as train.py trains and evaluates on them and eval_fid.py scores
    them, so that a reported reconstruction metric is always on images the tokenizer never saw.
    Built-in: `num_images` scenes of `seed` for training and `val_images` scenes of seed + 1 (a
    disjoint draw) held out, captioned with `builtin_captions` detail. A folder: a seeded shuffle holds out `val_images` images, at most a
    tenth of the folder, and at least one. Shards and Parquet (open_dataset) are split the same way,
    so the same images in the same order hold out the same ones in every format. A cache_dir (train.py's
    --cache-dir) keeps work a second start need not redo: the built-in images drawn, a real set's check.
    """
    if data == "builtin":
        return (ShapesDataset(num_images, image_size, seed, cache_dir, builtin_captions),
                ShapesDataset(val_images, image_size, seed + 1, cache_dir, builtin_captions))
    full = open_dataset(data, captions, image_size, skip_bad, progress, caption_key, image_key, cache_dir)
    if len(full) < 2:
        raise UserError(f"{data} has {len(full)} usable captioned image(s): training and a held-out "
                        f"evaluation need at least 2")
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, min(val_images, len(full) // 10))
    return Split(full, sorted(perm[n_val:])), Split(full, sorted(perm[:n_val]))


#################################################################################
#                 Cached features, read as a training step reads them           #
#################################################################################

def text_rows(cache, idx, trim=False):
    """Rows `idx` of a caption-embedding cache as stored, on the CPU -> (embeddings (B, Nt, Dt) fp16,
    mask (B, Nt) bool). trim=True drops the padding past the longest caption: exact (padded keys are
    masked out of attention), a third less compute; off under torch.compile, which recompiles per length."""
    order = np.asarray(idx)
    mask = np.asarray(cache[1][order])  # (B, Nt)
    length = max(1, int(mask.sum(1).max())) if trim else mask.shape[1]
    emb = np.ascontiguousarray(cache[0][order, :length])  # (B, length, Dt): the padding past it is never read
    return torch.from_numpy(emb), torch.from_numpy(np.ascontiguousarray(mask[:, :length]))


def fetch_text(cache, idx, device, trim=False):
    """text_rows on `device`, the embeddings as float32, or (None, None) without a cache: the caption
    rows an evaluation reads (a training step gets its rows from the loader, WithText)."""
    if cache is None:
        return None, None
    emb, mask = text_rows(cache, idx, trim)
    return emb.to(device, non_blocking=True).float(), mask.to(device, non_blocking=True)


class WithText:
    """
    The training loader's collate: a batch of (image, index, label) items -> (images, indices,
    labels, caption embeddings, mask), each item's caption rows read from the cache (text_rows),
    (None, None) without one. It runs where the images are loaded, in the DataLoader's workers,
    so a step does not wait while the main process reads the memory map.
    """

    def __init__(self, cache, trim=False):
        self.cache = None if cache is None else [MappedArray.of(a) for a in cache]  # pickled as paths
        self.trim = trim

    def __call__(self, items):
        x, idx, lab = torch.utils.data.default_collate(items)
        text, mask = (None, None) if self.cache is None else text_rows(self.cache, idx.numpy(), self.trim)
        return x, idx, lab, text, mask


def make_loader(dataset, batch_size, sampler, workers, pin=False, text=None, trim=False):
    """train.py's loader, which bench.py times: `dataset`'s batches in `sampler`'s order with their
    caption rows (WithText), read by `workers` processes that persist across epochs (started once,
    the dataset copied to them once), pinned (pin=True) so the copy to the GPU need not wait."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                       num_workers=workers, pin_memory=pin, persistent_workers=workers > 0,
                                       collate_fn=WithText(text, trim))


class LatentSet(torch.utils.data.Dataset):
    """The latent cache as a dataset whose item i is (latent tokens (N, d), i, label), the shape
    of an image dataset's items, so that both stages batch through the same loader."""

    def __init__(self, latents, labels):
        self.latents, self.labels = latents, labels

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.latents[i])), i, (-1 if self.labels is None else self.labels[i])


#################################################################################
#                                    Sampler                                    #
#################################################################################

class ShardedSampler(torch.utils.data.Sampler):
    """
    Each rank's share of a seeded per-epoch shuffle, starting at a given batch so a resumed run
    sees exactly the data the uninterrupted run would have (what DistributedSampler lacks).
    Every epoch is cut to a whole number of global batches, so all ranks take the same steps.
    """

    def __init__(self, n: int, batch_per_rank: int, rank: int = 0, world: int = 1, seed: int = 0):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch_per_rank, rank, world, seed
        self.steps_per_epoch = n // (batch_per_rank * world)
        if self.steps_per_epoch == 0:
            raise UserError(f"dataset of {n} images is smaller than one global batch "
                            f"({batch_per_rank} x {world} ranks); lower --batch-size")
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch: int, step_in_epoch: int):
        self.epoch, self.start_step = epoch, step_in_epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.n, generator=g)[: self.steps_per_epoch * self.batch * self.world]
        # Global batch k is order[k*B*W:(k+1)*B*W]; this rank takes its contiguous B-slice of it.
        order = order.view(self.steps_per_epoch, self.world, self.batch)[self.start_step:, self.rank]
        return iter(order.flatten().tolist())

    def __len__(self):
        return (self.steps_per_epoch - self.start_step) * self.batch


#################################################################################
#               Real data in the formats people have: shards, Parquet           #
#################################################################################

# Why an index and not a stream: webdataset's loaders stream each shard front to back, which needs an
# iterable dataset, and with it a second sampler, a second resume story and ranks that split shards
# rather than batches. Here a shard set is indexed once (where each image lies: a byte range of a tar,
# a row of a Parquet row group) and each image read on demand in __getitem__, so the map-style dataset,
# ShardedSampler (exact resume, ranks taking disjoint slices of every global batch) and the held-out
# split (load_splits) work unchanged on every format. What is kept in memory per image is that position
# (three integers), its key, its caption and its label: captions are small, and the caption-embedding
# cache needs them all anyway. The cost is random access: a tar read is one seek, but Parquet stores
# images in row groups read whole (see ParquetImages); for a long run convert once to shards
# (python data.py shards).

SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # img2dataset's image members, tried in this order
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img")  # the Hugging Face hub's, then img2dataset's
PARQUET_CAPTION_COLUMNS = ("caption", "text", "txt", "prompt")
PARQUET_LABEL_COLUMNS = ("label", "cls")


def expand_braces(pattern: str) -> list[str]:
    """webdataset's shard patterns: 'shards/{00000..00002}.tar' -> shards/00000.tar ... 00002.tar (zero
    padding kept), 'a/{x,y}.tar' -> a/x.tar, a/y.tar; several braces multiply."""
    import re
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail, body = pattern[:m.start()], pattern[m.end():], m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi, width = int(r.group(1)), int(r.group(2)), len(r.group(1))
        parts = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    else:
        parts = body.split(",")
    return [p for part in parts for p in expand_braces(head + part + tail)]


def data_format(data: str):
    """What --data names -> (format, paths): ('builtin', []), ('folder', [data]), or ('shards' |
    'parquet', the sorted files). A folder holding images is an image folder; one holding .tar files
    is a shard set (img2dataset writes a metadata .parquet beside each .tar: those are not read); one
    holding only .parquet files, at any depth (the hub puts them in data/), is a Parquet dataset.
    A brace pattern or a glob names the files themselves."""
    import glob
    if data == "builtin":
        return "builtin", []
    if os.path.isdir(data):
        tars, parquets = [], []
        for d, subdirs, names in os.walk(data):
            subdirs.sort()
            if any(n.lower().endswith(IMAGE_EXTS) for n in names):
                return "folder", [data]  # images come first in a top-down walk of a class-folder tree
            tars += [os.path.join(d, n) for n in names if n.endswith(".tar")]
            parquets += [os.path.join(d, n) for n in names if n.endswith(".parquet")]
        if tars:
            return "shards", sorted(tars)
        return ("parquet", sorted(parquets)) if parquets else ("folder", [data])
    if os.path.isfile(data) and data.endswith((".tar", ".parquet")):
        return ("shards" if data.endswith(".tar") else "parquet"), [data]
    if not any(c in data for c in "{*?["):
        return "folder", [data]  # CaptionedImages says it does not exist
    paths = []
    for pattern in expand_braces(data):
        if any(c in pattern for c in "*?["):
            paths += sorted(glob.glob(pattern))
        elif not os.path.isfile(pattern):
            raise MissingFile(f"{pattern} (of --data {data}) does not exist; fix --data")
        else:
            paths.append(pattern)
    if not paths:
        raise MissingFile(f"--data {data} matches no file; fix --data")
    kinds = {os.path.splitext(p)[1] for p in paths}
    if kinds == {".tar"}:
        return "shards", paths
    if kinds == {".parquet"}:
        return "parquet", paths
    raise UserError(f"--data {data} matches {', '.join(sorted(kinds))} files; name only .tar shards or only "
                    f".parquet files")


def open_dataset(data: str, captions: str = None, image_size: int = 256, skip_bad: bool = False,
                 progress: bool = True, caption_key: str = None, image_key: str = None, cache_dir: str = None):
    """The whole real dataset behind --data, of any format (data_format): what load_splits splits. With a
    cache_dir, its decode check is recorded there for the next start (checked_once)."""
    kind, paths = data_format(data)
    if kind == "folder":
        if not captions:
            raise UserError(f"--data {data} needs --captions FILE.jsonl (one {{\"file\", \"caption\"}} per line)")
        return CaptionedImages(data, captions, image_size, skip_bad, progress, cache_dir)
    if captions:
        raise UserError(f"--captions {captions}: the {kind} of --data {data} carry their own captions; drop "
                        f"--captions (pick the caption with --caption-key)")
    cls = ShardImages if kind == "shards" else ParquetImages
    return cls(paths, image_size, skip_bad, progress, caption_key, image_key, cache_dir)


def bytes_problem(data: bytes, size: int):
    """None when encoded image bytes decode as training will decode them; else, in one line, why not."""
    import io
    try:
        load_rgb(io.BytesIO(data), draft=(size, size))
        return None
    except Exception as e:  # truncated, not an image, an unknown mode, a decompression bomb, ...
        import re
        return f"unreadable image ({re.sub(r'<_io.BytesIO object at 0x[0-9a-f]+>', 'its bytes', first_line(e))})"


def label_list(raw):
    """Per-sample labels (ints, or class names numbered in sorted order) when every sample has one, else None."""
    if not raw or any(r is None for r in raw):
        return None
    if all(isinstance(r, int) for r in raw):
        return list(raw)
    names = sorted({str(r) for r in raw})
    return [names.index(str(r)) for r in raw]


def parse_label(text):
    """A cls member's text (or a JSON label): an int when it reads as one, else the class name."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if isinstance(text, str):
        text = text.strip()
        return int(text) if text.lstrip("-").isdigit() else text or None
    return text


class IndexedImages(torch.utils.data.Dataset):
    """
    What ShardImages and ParquetImages share: a subclass indexes its files (index: appending to
    .names, .captions, raw labels, .where, and to `problems` {name: one line}), and reads one
    image's encoded bytes (read); this class decode-checks every image up front as
    CaptionedImages does, reports or skips the bad ones, and serves the rest as CaptionedImages
    serves a folder: (image (3, H, W) in [-1, 1], index, label or -1).
    """

    def __init__(self, paths, image_size, skip_bad, progress, caption_key, image_key, cache_dir=None):
        from tqdm import tqdm
        self.paths, self.image_size = list(paths), image_size
        self.caption_key, self.image_key = caption_key, image_key
        self.names, self.captions, raw_labels, self.where = [], [], [], []  # per sample
        problems = {}
        self.index(problems, raw_labels, progress)
        good = self.check_images(problems, progress, cache_dir)
        self.skipped = skip_or_refuse(problems, skip_bad, progress)
        if not good:
            raise UserError(f"no usable captioned images in {self.paths[0]}" +
                            (f" and {len(self.paths) - 1} more file(s)" if len(self.paths) > 1 else ""))
        self.names = [self.names[i] for i in good]
        self.files = self.names  # as CaptionedImages names its images (eval_fid.py recon lists them)
        self.captions = [self.captions[i] for i in good]
        self.where = np.array([self.where[i] for i in good], dtype=np.int64)  # (n, 3): compact, shared by workers
        self.labels = label_list([raw_labels[i] for i in good])

    def check_images(self, problems, progress, cache_dir=None, chunk=256):
        """Decodes every image once, as training decodes it, in file order (threads: PIL decodes without
        the GIL; a chunk at a time, so no more than `chunk` images are held), or reads the record of an
        earlier check (checked_once); -> the good samples."""
        from tqdm import tqdm

        def check():
            found, batch = {}, []  # found: {sample number (a string, as JSON keys are): problem}
            bar = tqdm(total=len(self.names), desc="checking images", disable=not progress, unit="img")

            def flush():
                for (i, _), problem in zip(batch, pool.map(lambda p: "null image" if p[1] is None
                                                           else bytes_problem(p[1], self.image_size), batch)):
                    if problem:
                        found[str(i)] = f"{self.describe(i)}: {problem}; drop the {self.item}, or pass --skip-bad"
                bar.update(len(batch))
                batch.clear()
            with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
                for i in range(len(self.names)):
                    batch.append((i, self.read(i)))
                    if len(batch) == chunk:
                        flush()
                flush()
            bar.close()
            return found
        # What the index says is read (each sample's name and place, the image column or member), in which files.
        key = [type(self).__name__, [os.path.abspath(p) for p in self.paths], file_stats(self.paths), self.image_size,
               self.image_key, getattr(self, "image_columns", None), self.names, self.where]
        bad = checked_once(cache_dir, key, check, progress)
        problems.update((self.names[int(i)], problem) for i, problem in bad.items())
        return [i for i in range(len(self.names)) if str(i) not in bad]

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        import io
        try:
            img = load_rgb(io.BytesIO(self.read(i)))
        except Exception as e:  # it decoded when the dataset was built: changed during the run?
            raise UserError(f"{self.describe(i)}: unreadable image ({first_line(e)}), though it decoded when "
                            f"training started; was the file changed since?") from None
        return to_tensor(center_crop(img, self.image_size)), i, (self.labels[i] if self.labels is not None else -1)

    def load_image(self, i) -> Image.Image:
        """Sample i's image, full size, as 8-bit RGB (write_shards resizes it)."""
        import io
        return load_rgb(io.BytesIO(self.read(i)))


class ShardImages(IndexedImages):
    """
    webdataset shards as img2dataset writes them: tar files whose members KEY.jpg (or .png, .webp)
    and KEY.txt (or a "caption" in KEY.json) are one sample, with an optional KEY.cls (the class:
    a number or a name). Read with the standard library's tarfile: the index is each image
    member's byte range, each image one seek and one read. --image-key picks the image member's
    extension, --caption-key the caption's (a member KEY.<ext>, else a field of KEY.json).
    """

    item = "sample"  # what a bad image's fix drops

    def index(self, problems, raw_labels, progress):
        import tarfile
        from tqdm import tqdm
        for s, path in enumerate(tqdm(self.paths, desc="indexing shards", disable=not progress, unit="shard")):
            members, order, damage, last = {}, [], None, None  # key -> {ext: TarInfo}; the last member read
            try:
                with tarfile.open(path, "r:") as tar:
                    for m in tar:
                        last, base = m.name, os.path.basename(m.name)
                        if not m.isfile() or "." not in base:
                            continue
                        key = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])  # webdataset's key
                        if key not in members:
                            members[key] = {}
                            order.append(key)
                        members[key][base.split(".", 1)[1].lower()] = m
                    end = tar.offset  # past the last member read
                with open(path, "rb") as f:
                    f.seek(end)
                    if f.read(512) != bytes(512):
                        # tarfile stops quietly at a cut-off or damaged header: a whole tar ends in a zero block
                        damage = (f"truncated or damaged {f'after member {last}' if last else 'at its start'} "
                                  f"(byte {end} of {os.path.getsize(path)})")
            except (tarfile.TarError, OSError, EOFError) as e:  # tarfile: "unexpected end of data" past a cut member
                damage = (f"truncated or damaged after member {last} ({first_line(e)})" if last
                          else f"not a readable tar ({first_line(e)})")
            if damage:
                problems[path] = f"{path}: {damage}; write or download it again, or pass --skip-bad"
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                for key in order:
                    self.add_sample(s, path, key, members[key], f, size, problems, raw_labels)

    def add_sample(self, s, path, key, parts, f, size, problems, raw_labels):
        """One sample's members -> its index entry, or a problem naming the shard and the key."""
        name = f"{os.path.basename(path)}/{key}"
        read = lambda m: (f.seek(m.offset_data), f.read(m.size))[1]
        image_exts = (self.image_key,) if self.image_key else SHARD_IMAGE_EXTS
        image = next((parts[e] for e in image_exts if e in parts), None)
        caption = label = None
        try:
            if (self.caption_key or "txt") in parts:
                caption = read(parts[self.caption_key or "txt"]).decode("utf-8")
            elif "json" in parts:  # img2dataset's metadata: {"caption": ..., "url": ..., ...}
                meta = json.loads(read(parts["json"]).decode("utf-8"))
                caption = meta.get(self.caption_key or "caption") if isinstance(meta, dict) else None
            if "cls" in parts:
                label = parse_label(read(parts["cls"]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            problems[name] = f"{path}: {key}: a caption or label member does not read ({first_line(e)}); fix it, " \
                             f"or pass --skip-bad"
            return
        wanted = f"{key}.{'/'.join(image_exts)}"
        caption_names = (f"{key}.{self.caption_key} or a \"{self.caption_key}\" in {key}.json" if self.caption_key
                         else f"{key}.txt or a \"caption\" in {key}.json")
        if image is None and caption is None:
            problems[name] = f"{path}: {key}: neither an image ({wanted}) nor a caption ({caption_names}); " \
                             f"members: {', '.join(sorted(parts))}; pass --image-key/--caption-key, or --skip-bad"
        elif image is None:
            problems[name] = f"{path}: {key}: a caption but no image ({wanted}); add it, pass --image-key EXT, " \
                             f"or --skip-bad"
        elif not isinstance(caption, str) or not caption.strip():
            what = "no" if caption is None else "an empty" if isinstance(caption, str) else f"a non-text ({caption!r})"
            problems[name] = f"{path}: {key}: an image with {what} caption ({caption_names}); add it, pass " \
                             f"--caption-key, or --skip-bad"
        elif image.offset_data + image.size > size:
            problems[name] = f"{path}: {key}: {os.path.basename(image.name)} is cut off (the tar is truncated); " \
                             f"write or download the shard again, or pass --skip-bad"
        else:
            self.names.append(name)
            self.captions.append(caption.strip())
            raw_labels.append(label)
            self.where.append((s, image.offset_data, image.size))

    def read(self, i):
        s, offset, size = (int(v) for v in self.where[i])
        with open(self.paths[s], "rb") as f:  # opened per read: nothing to share across DataLoader workers
            f.seek(offset)
            return f.read(size)

    def describe(self, i):
        s = int(self.where[i][0])
        return f"{self.paths[s]}: {self.names[i].split('/', 1)[1]}"


def import_pyarrow():
    """pyarrow.parquet, or one line saying how to get it (an optional dependency: only Parquet needs it)."""
    try:
        import pyarrow.parquet as pq
        return pq
    except ImportError:
        raise UserError("reading Parquet needs pyarrow: pip install pyarrow") from None


class ParquetImages(IndexedImages):
    """
    Parquet files as the Hugging Face hub and img2dataset write them: one row per image, the image
    column holding encoded bytes (or a struct {"bytes": ..., "path": ...}, the hub's Image feature),
    a caption column, and an optional "label" column. Read with pyarrow: captions and labels are
    read whole; images by row group on demand. Parquet cannot read one row of a column, only a
    row group's chunk of it, so a random image costs its whole row group (the hub writes 100 images
    per group): each DataLoader worker keeps the last group it read, which helps in-order reads (the
    up-front check, eval_fid.py) but not training's shuffle. Convert to shards for a long run.
    """

    item = "row"

    def index(self, problems, raw_labels, progress):
        from tqdm import tqdm
        pq = import_pyarrow()
        self.image_columns = []
        for p, path in enumerate(tqdm(self.paths, desc="indexing Parquet", disable=not progress, unit="file")):
            try:
                pf = pq.ParquetFile(path)
            except Exception as e:  # pyarrow's errors: ArrowInvalid (not Parquet, truncated), OSError
                raise UserError(f"{path}: not a readable Parquet file ({first_line(e)}); fix --data") from None
            columns = pf.schema_arrow.names
            pick = lambda key, names, what, flag: self.column(path, columns, key, names, what, flag)
            image_col = pick(self.image_key, PARQUET_IMAGE_COLUMNS, "image", "--image-key")
            caption_col = pick(self.caption_key, PARQUET_CAPTION_COLUMNS, "caption", "--caption-key")
            label_col = next((c for c in PARQUET_LABEL_COLUMNS if c in columns), None)
            self.image_columns.append(image_col)
            row = 0
            for g in range(pf.num_row_groups):
                table = pf.read_row_group(g, columns=[caption_col] + ([label_col] if label_col else []))
                caps = table.column(caption_col).to_pylist()
                labels = table.column(label_col).to_pylist() if label_col else [None] * len(caps)
                for r, (caption, label) in enumerate(zip(caps, labels)):
                    name = f"{os.path.basename(path)}:{row + r}"
                    if not isinstance(caption, str) or not caption.strip():
                        what = "null" if caption is None else "empty" if isinstance(caption, str) else \
                            f"non-text ({caption!r})"
                        problems[name] = f"{path}: row {row + r}: {what} caption (column {caption_col}); drop " \
                                         f"the row, or pass --skip-bad"
                        continue
                    self.names.append(name)
                    self.captions.append(caption.strip())
                    raw_labels.append(parse_label(label))
                    self.where.append((p, g, r))
                row += len(caps)

    @staticmethod
    def column(path, columns, key, candidates, what, flag):
        """The column named by the flag, or the first of the usual names that the file has."""
        if key is not None:
            if key not in columns:
                raise UserError(f"{path} has no column {key!r} (columns: {', '.join(columns)}); fix {flag}")
            return key
        found = next((c for c in candidates if c in columns), None)
        if found is None:
            raise UserError(f"{path} has no {what} column (tried {', '.join(candidates)}; columns: "
                            f"{', '.join(columns)}); pass {flag} COLUMN")
        return found

    def read(self, i):
        p, g, r = (int(v) for v in self.where[i])
        cache = getattr(self, "_group", None)
        if cache is None or cache[0] != (os.getpid(), p, g):  # per process: DataLoader workers fork
            pq = import_pyarrow()
            column = pq.ParquetFile(self.paths[p]).read_row_group(g, columns=[self.image_columns[p]]).column(0)
            self._group = cache = ((os.getpid(), p, g), column)
        value = cache[1][r].as_py()
        if isinstance(value, dict):  # the hub's Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes")
        return value  # None: a null image (reported by the up-front check)

    def describe(self, i):
        p = int(self.where[i][0])
        return f"{self.paths[p]}: row {self.names[i].rsplit(':', 1)[1]}"


def write_shards(dataset, out_dir: str, size: int, per_shard: int = 1000, image_format: str = "jpg",
                 progress: bool = True) -> list[str]:
    """
    Any real dataset (a folder, shards, Parquet) as webdataset shards of images center-cropped to
    `size` (center_crop, as training crops): out_dir/00000.tar, ... of `per_shard` samples, each
    KEY.jpg (or .png), KEY.txt and, with labels, KEY.cls, KEY being the sample's number. Samples
    keep the dataset's order, so load_splits holds out the same images from the shards as from the
    source. Each shard is written atomically. -> the shard paths.
    """
    import io
    import tarfile
    from tqdm import tqdm
    from files import atomic_write
    os.makedirs(out_dir, exist_ok=True)
    width = max(8, len(str(len(dataset))))

    def raw(i):  # the full-size image: CaptionedImages names a file, the indexed formats read bytes
        if hasattr(dataset, "load_image"):
            return dataset.load_image(i)
        return load_rgb(os.path.join(dataset.root, dataset.files[i]))

    def encode(i):
        buf = io.BytesIO()
        img = center_crop(raw(i), size)
        img.save(buf, "JPEG", quality=95) if image_format == "jpg" else img.save(buf, "PNG")
        return buf.getvalue()

    def add(tar, name, payload):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(payload), 0, 0o644  # mtime 0: the same data gives the same bytes
        tar.addfile(info, io.BytesIO(payload))

    paths = []
    bar = tqdm(total=len(dataset), desc="writing shards", disable=not progress, unit="img")
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        for n, start in enumerate(range(0, len(dataset), per_shard)):
            rows = range(start, min(start + per_shard, len(dataset)))
            images = list(pool.map(encode, rows))  # one shard's images at a time

            def write(tmp):
                with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                    for i, payload in zip(rows, images):
                        key = f"{i:0{width}d}"
                        add(tar, f"{key}.{image_format}", payload)
                        add(tar, f"{key}.txt", dataset.captions[i].encode("utf-8"))
                        if dataset.labels is not None:
                            add(tar, f"{key}.cls", str(dataset.labels[i]).encode())
            paths.append(os.path.join(out_dir, f"{n:05d}.tar"))
            atomic_write(paths[-1], write)
            bar.update(len(rows))
    bar.close()
    return paths


def main(argv=None):
    """python data.py shards: a folder + caption file (or Parquet, or other shards) as resized shards."""
    import argparse
    from files import check_ranges
    p = argparse.ArgumentParser(description="Converts real data to resized webdataset shards: python data.py "
                                            "shards --data DIR --captions FILE.jsonl --out OUT --size 128")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("shards", help="write resized webdataset shards")
    s.add_argument("--data", required=True, help="an image folder, shards or Parquet, as train.py reads them")
    s.add_argument("--captions", default=None, help="JSON-lines caption file for --data FOLDER")
    s.add_argument("--caption-key", default=None, help="as train.py's")
    s.add_argument("--image-key", default=None, help="as train.py's")
    s.add_argument("--out", required=True, help="folder for 00000.tar, 00001.tar, ...")
    s.add_argument("--size", type=int, default=256, help="side of the center-cropped square images")
    s.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    s.add_argument("--format", default="jpg", choices=["jpg", "png"], help="jpg (quality 95) or png (lossless)")
    s.add_argument("--skip-bad", action="store_true", help="skip (and count) bad images/captions instead of failing")
    args = p.parse_args(argv)
    check_ranges(p, args, at_least_1=("size", "per_shard"))
    dataset = open_dataset(args.data, args.captions, args.size, args.skip_bad, True, args.caption_key,
                           args.image_key)
    paths = write_shards(dataset, args.out, args.size, args.per_shard, args.format)
    print(f"wrote {len(dataset)} images in {len(paths)} shard(s) to {args.out} (train with --data {args.out})")
    return paths


if __name__ == "__main__":
    from files import run_main
    run_main(main)
