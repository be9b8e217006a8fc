"""
Real captioned image sets from package registries, written in the layout train.py reads (an image
folder + a JSON-lines caption file), so that `reproduce.py --data DIR --captions FILE` runs on real
captions with no dataset hub. Each caption is the source's own text, never made up here.

    npm pack emoji-datasource-google   # Google's Noto emoji, 64 px PNGs + emoji.json (Unicode names)
    python prepare.py emoji emoji-datasource-google-*.tgz --out data/emoji
    npm pack openmoji                  # OpenMoji: colour SVGs + openmoji.csv (name, group, subgroup)
    pip install cairosvg               # only to draw OpenMoji's SVGs (needs the cairo library)
    python prepare.py openmoji openmoji-*.tgz --out data/openmoji

    python reproduce.py --data data/emoji/images --captions data/emoji/captions.jsonl

What their captions say (the README's real-data results use both):
  emoji     the Unicode name, lower-cased: "grinning face with sweat", "flag: Japan" (short names;
            1,911 images, skin-tone variants left out: their names are not in the source)
  openmoji  the CLDR annotation, then group and subgroup: "grinning face; smileys emotion, face
            smiling" (a title and its category; 4,000+ images, OpenMoji's extras included)
Transparent pixels go onto white (data.load_rgb does the same for any RGBA image), and every image
is stored at --size px, at least the largest size a run here trains at.
"""
import argparse
import csv
import io
import json
import os
import random
import tarfile

from PIL import Image
from tqdm import tqdm

from files import UserError, check_ranges, first_line, run_main, write_text


def get_args(argv=None):
    """Which source, its package file, where to write, at which size."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", choices=["emoji", "openmoji"], help="which package it is")
    p.add_argument("package", help="the .tgz that `npm pack` wrote")
    p.add_argument("--out", required=True, help="folder to write images/ and captions.jsonl into")
    p.add_argument("--size", type=int, default=64, help="side of the stored images in px")
    p.add_argument("--max-images", type=int, default=None, help="keep this many of the images, drawn at "
                   "random (seed 0): a smaller set of the same kind, where the detokenizer can learn its "
                   "captions by heart (docs/real-data.md's emoji-900)")
    args = p.parse_args(argv)
    if args.max_images is not None:
        check_ranges(p, args, at_least_1=("max_images",))
    return args


def members(package):
    """{path inside the package: file object} of an npm package file; one line if it is not one."""
    try:
        tar = tarfile.open(package)
        return tar, {m.name: m for m in tar.getmembers() if m.isfile()}
    except (OSError, tarfile.TarError) as e:
        raise UserError(f"{package}: not a readable npm package ({first_line(e)}); get it with `npm pack NAME`") from None


def read_member(tar, index, name, package):
    """The bytes of one file of the package, or a one-line error naming what is missing."""
    if name not in index:
        raise UserError(f"{package}: has no {name}; is it the right package (see prepare.py --help)?")
    return tar.extractfile(index[name]).read()


def emoji_items(package):
    """(file name, caption, category, image bytes) of emoji-datasource-google: its base emoji."""
    tar, index = members(package)
    table = json.loads(read_member(tar, index, "package/emoji.json", package))
    for e in table:
        path = f"package/img/google/64/{e['image']}"
        # The Unicode name is the source's caption ("GRINNING FACE WITH SWEAT"); a few have none.
        if e.get("has_img_google") and e.get("name") and path in index:
            yield e["image"], e["name"].lower(), e["category"], read_member(tar, index, path, package)


def openmoji_items(package):
    """(file name, caption, group, SVG bytes) of the openmoji package: every emoji it draws."""
    tar, index = members(package)
    rows = csv.DictReader(io.StringIO(read_member(tar, index, "package/data/openmoji.csv", package).decode()))
    for r in rows:
        path = f"package/color/svg/{r['hexcode']}.svg"
        if path in index and r["annotation"].strip():
            group, sub = r["group"].replace("-", " "), r["subgroups"].replace("-", " ")
            yield f"{r['hexcode']}.png", f"{r['annotation'].strip()}; {group}, {sub}", r["group"], \
                read_member(tar, index, path, package)


def to_png(data, svg, size):
    """An image file's bytes -> an RGB PIL image of size x size, transparency onto white."""
    if svg:
        try:
            import cairosvg
        except ImportError:
            raise UserError("OpenMoji ships SVGs: `pip install cairosvg` to draw them") from None
        data = cairosvg.svg2png(bytestring=data, output_width=size, output_height=size)
    img = Image.open(io.BytesIO(data)).convert("RGBA").resize((size, size), Image.LANCZOS)
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, img).convert("RGB")


def main(argv=None):
    """Writes <out>/images/*.png and <out>/captions.jsonl ({file, caption, label: the category})."""
    args = get_args(argv)
    items = {"emoji": emoji_items, "openmoji": openmoji_items}[args.source](args.package)
    if args.max_images is not None:  # a seeded draw, then in name order: the same subset on every machine
        items = list(items)
        random.Random(0).shuffle(items)
        items = sorted(items[:args.max_images], key=lambda item: item[0])
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    lines, failed = [], []
    for name, caption, category, data in tqdm(items, desc=f"writing {args.out}", unit="img"):
        try:
            img = to_png(data, args.source == "openmoji", args.size)
        except UserError:
            raise
        except Exception as e:  # a drawing the SVG renderer cannot handle: left out, and counted
            failed.append(f"{name} ({type(e).__name__}: {e})")
            continue
        img.save(os.path.join(args.out, "images", name))
        lines.append(json.dumps({"file": name, "caption": caption, "label": category}))
    if failed:
        print(f"left out {len(failed)} image(s) that would not draw, e.g. {failed[0]}")
    if not lines:
        raise UserError(f"{args.package}: no captioned images found; is it the {args.source} package?")
    # The caption file last: a folder with captions.jsonl is a finished one.
    write_text(os.path.join(args.out, "captions.jsonl"), "\n".join(lines) + "\n")
    print(f"{len(lines)} captioned images in {args.out}/images, captions in {args.out}/captions.jsonl")


if __name__ == "__main__":
    run_main(main)
