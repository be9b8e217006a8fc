"""What data.py promises: a deterministic built-in dataset whose captions describe its images,
real-data loading with every conversion, and a clear error (or a counted skip) for bad input."""
import copy
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from data import (CAPTION_DETAILS, COLORS, PLACES, SHAPES, SIZES, CaptionedImages, ShapesDataset, ShardedSampler,
                  caption_of, center_crop, load_rgb, make_scene, render)


def test_builtin_dataset_is_deterministic_by_seed():
    a, b, c = ShapesDataset(6, 32, seed=7), ShapesDataset(6, 32, seed=7), ShapesDataset(6, 32, seed=8)
    assert a.captions == b.captions and a.captions != c.captions
    for i in range(6):
        assert torch.equal(a[i][0], b[i][0])
    assert not all(torch.equal(a[i][0], c[i][0]) for i in range(6))
    x = a[0][0]
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1


def nearest_color(rgb):
    return min(COLORS, key=lambda n: sum((int(c) - int(v)) ** 2 for c, v in zip(COLORS[n], rgb)))


CAPTION_OBJECT = re.compile(r"an? (small|medium|large) (\w+) (circle|square|triangle|diamond|cross|star) "
                            r"(?:in|at) the ((?:top |bottom )?(?:left|right)|top|bottom|center)")


def test_captions_describe_their_images():
    # Property test over many scenes: read each caption back, then check the image says the same.
    size = 96
    data = ShapesDataset(200, size, seed=11)
    for i in range(len(data)):
        caption, scene = data.captions[i], data.scenes[i]
        img = ((data[i][0].permute(1, 2, 0) + 1) * 127.5).round().numpy()
        objects = CAPTION_OBJECT.findall(caption)
        assert len(objects) == len(scene["objects"]), caption
        background = re.search(r"on an? (\w+) background$", caption).group(1)
        cell = size / 3
        for (size_word, color, shape, place), truth in zip(objects, scene["objects"]):
            row, col = divmod(PLACES.index(place), 3)
            cx = (col + 0.5 + truth["jitter"][0]) * cell
            cy = (row + 0.5 + truth["jitter"][1]) * cell
            assert col * cell <= cx < (col + 1) * cell and row * cell <= cy < (row + 1) * cell  # in its named cell
            assert nearest_color(img[int(cy), int(cx)]) == color, (i, caption)  # the named colour
            assert size_word in SIZES and shape == truth["shape"]
        empty = set(range(9)) - {PLACES.index(o[3]) for o in objects}
        for c in empty:  # an empty cell shows the named background
            row, col = divmod(c, 3)
            assert nearest_color(img[int((row + 0.5) * cell), int((col + 0.5) * cell)]) == background, (i, caption)


def test_captions_leave_detail_to_the_image_tokens():
    # The same caption fits many images: where in its cell an object sits, its rotation and
    # shade, and the background gradient are left for the image tokens to carry.
    scene = make_scene(3, seed=0)
    other = copy.deepcopy(scene)
    for o in other["objects"]:
        o["jitter"], o["angle"], o["shade"] = -o["jitter"], o["angle"] + 0.7, 2.0 - o["shade"]
    other["gradient"]["angle"] += 1.0
    assert caption_of(scene) == caption_of(other)
    a, b = (np.asarray(render(s, 64), dtype=float) for s in (scene, other))
    assert np.abs(a - b).mean() > 2  # visibly different images (mean |difference| in 0-255 units)


def test_shorter_builtin_captions_say_less_about_the_same_images():
    # --builtin-captions (issue 24): what the caption says changes, the images and labels do not.
    sets = {d: ShapesDataset(40, 16, seed=2, detail=d) for d in CAPTION_DETAILS}
    words = lambda caption: set(re.findall(r"[a-z]+", caption))
    color_words, place_words = set(COLORS), set(" ".join(PLACES).split())
    for i in range(40):
        assert all(torch.equal(sets["full"][i][0], s[i][0]) for s in sets.values())
        scene = sets["full"].scenes[i]
        assert sets["full"].captions[i] == caption_of(scene)  # "full" is the caption every run had so far
        said = {d: words(s.captions[i]) for d, s in sets.items()}
        assert scene["background"] in said["full"]
        assert not said["no-colors"] & color_words and place_words & said["full"] <= said["no-colors"]
        assert not said["no-places"] & place_words and color_words & said["full"] <= said["no-places"]
        assert said["shapes"] <= {"a", "and", *SHAPES} and {o["shape"] for o in scene["objects"]} <= said["shapes"]
    assert all(s.labels == sets["full"].labels for s in sets.values())
    with pytest.raises(ValueError, match="no-colours"):
        caption_of(make_scene(0), "no-colours")


def write(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    rgb = Image.new("RGB", (40, 30), (200, 10, 10))
    write(root / "rgb.jpg", rgb)
    write(root / "gray.png", Image.new("L", (30, 30), 128))
    rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 0))  # fully transparent blue -> white
    write(root / "rgba.png", rgba)
    write(root / "palette.gif", Image.new("RGB", (32, 32), (0, 200, 0)).convert("P"))
    lines = [{"file": "rgb.jpg", "caption": "a red picture"}, {"file": "gray.png", "caption": "gray"},
             {"file": "rgba.png", "caption": "nothing"}, {"file": "palette.gif", "caption": "a green picture"}]
    caps = tmp_path / "captions.jsonl"
    caps.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return root, caps


def test_folder_dataset_converts_every_mode(folder):
    root, caps = folder
    data = CaptionedImages(str(root), str(caps), image_size=16, progress=False)
    assert len(data) == 4 and data.labels is None
    by_file = {f: data[i][0] for i, f in enumerate(data.files)}
    for x in by_file.values():
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(by_file["rgba.png"], torch.ones(3, 16, 16))  # transparency -> white
    assert torch.allclose(by_file["gray.png"][0], by_file["gray.png"][2])  # gray -> equal channels
    assert by_file["palette.gif"][1].mean() > 0.4  # palette -> its green
    assert data.captions[data.files.index("rgb.jpg")] == "a red picture"


def test_class_folders_give_labels(tmp_path):
    root = tmp_path / "train"
    lines = []
    for cls in ("n02", "n01"):
        for k in range(2):
            write(root / cls / f"{k}.png", Image.new("RGB", (20, 20), (k * 50, 0, 0)))
            lines.append({"file": f"{cls}/{k}.png", "caption": f"an image of class {cls}"})
    caps = tmp_path / "c.jsonl"
    caps.write_text("\n".join(json.dumps(line) for line in lines))
    data = CaptionedImages(str(root), str(caps), image_size=16, progress=False)
    assert [data[i][2] for i in range(4)] == [0, 0, 1, 1]  # n01 -> 0, n02 -> 1 (sorted)


def test_bad_input_errors_name_the_file(folder, tmp_path):
    root, caps = folder
    (root / "broken.jpg").write_bytes(b"this is not a jpeg")
    with caps.open("a") as f:
        f.write(json.dumps({"file": "broken.jpg", "caption": "broken"}) + "\n")
    with pytest.raises(ValueError, match=r"broken\.jpg: unreadable image.*--skip-bad"):
        CaptionedImages(str(root), str(caps), 16, progress=False)
    data = CaptionedImages(str(root), str(caps), 16, skip_bad=True, progress=False)
    assert len(data) == 4 and data.skipped == 1

    write(root / "uncaptioned.png", Image.new("RGB", (20, 20)))
    with pytest.raises(ValueError, match=r"uncaptioned\.png: image has no caption"):
        CaptionedImages(str(root), str(caps), 16, progress=False)
    (root / "uncaptioned.png").unlink()
    (root / "broken.jpg").unlink()

    empty = tmp_path / "empty.jsonl"
    empty.write_text(caps.read_text().replace('"a red picture"', '"   "'))
    with pytest.raises(ValueError, match=r"rgb\.jpg: empty caption"):
        CaptionedImages(str(root), str(empty), 16, progress=False)
    assert len(CaptionedImages(str(root), str(empty), 16, skip_bad=True, progress=False)) == 3

    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text('{"file": "rgb.jpg", "caption": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"garbled\.jsonl:2"):
        CaptionedImages(str(root), str(garbled), 16, progress=False)
    with pytest.raises(FileNotFoundError, match="--data"):
        CaptionedImages(str(tmp_path / "nope"), str(caps), 16, progress=False)
    with pytest.raises(FileNotFoundError, match="--captions"):
        CaptionedImages(str(root), str(tmp_path / "nope.jsonl"), 16, progress=False)


def test_center_crop_keeps_the_middle():
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, 100:200] = 255  # a white middle third on a wide image
    out = np.asarray(center_crop(Image.fromarray(arr), 32))
    assert out.shape == (32, 32, 3) and out[4:-4, 4:-4].min() > 200


def test_sharded_sampler_partitions_global_batches_and_resumes():
    n, B, W = 50, 4, 3
    ranks = [list(ShardedSampler(n, B, r, W, seed=1)) for r in range(W)]
    steps = ShardedSampler(n, B, 0, W).steps_per_epoch
    assert steps == 4
    flat = [i for r in ranks for i in r]
    assert len(flat) == len(set(flat)) == steps * B * W  # disjoint, and every rank takes the same steps
    single = list(ShardedSampler(n, B * W, 0, 1, seed=1))
    for k in range(steps):  # global batch k of W ranks == batch k of one process with W x the batch
        assert sorted(single[k * B * W:(k + 1) * B * W]) == sorted(i for r in ranks for i in r[k * B:(k + 1) * B])
    resumed = ShardedSampler(n, B, 1, W, seed=1)
    resumed.set_position(0, 2)
    assert list(resumed) == ranks[1][2 * B:]


def test_a_truncated_jpeg_is_caught_before_training_and_skipped_by_flag(folder):
    import io
    root, caps = folder
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # passes PIL's verify()
    with caps.open("a") as f:
        f.write(json.dumps({"file": "cut.jpg", "caption": "half a picture"}) + "\n")
    with pytest.raises(ValueError, match=r"cut\.jpg: unreadable image \(OSError: image file is truncated"):
        CaptionedImages(str(root), str(caps), 16, progress=False)
    data = CaptionedImages(str(root), str(caps), 16, skip_bad=True, progress=False)
    assert data.skipped == 1 and "cut.jpg" not in data.files
    assert all(data[i][0].shape == (3, 16, 16) for i in range(len(data)))  # what a DataLoader would read


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    root = tmp_path / "deep"
    write(root / "gray16.png", Image.fromarray(np.full((20, 20), 128 * 257, np.uint16)))  # mode I;16
    write(root / "gray32.tif", Image.fromarray(np.full((20, 20), 64 * 257, np.int32)))  # mode I
    write(root / "float.tif", Image.fromarray(np.full((20, 20), 0.25, np.float32)))  # mode F, in [0, 1]
    ramp = np.tile(np.linspace(-3.0, 5.0, 20, dtype=np.float32), (20, 1))  # mode F, another range
    write(root / "ramp.tif", Image.fromarray(ramp))
    assert [Image.open(root / f).mode for f in ("gray16.png", "gray32.tif", "float.tif")] == ["I;16", "I", "F"]
    caps = tmp_path / "c.jsonl"
    caps.write_text("".join(json.dumps({"file": f, "caption": f}) + "\n" for f in sorted(os.listdir(root))))
    data = CaptionedImages(str(root), str(caps), 16, progress=False)
    value = {f: round((data[i][0].mean().item() + 1) * 127.5) for i, f in enumerate(data.files)}
    assert value["gray16.png"] == 128 and value["gray32.tif"] == 64 and value["float.tif"] == 64
    ramp_pixels = np.asarray(load_rgb(str(root / "ramp.tif")))[0, :, 0]
    assert ramp_pixels[0] == 0 and ramp_pixels[-1] == 255  # stretched from its minimum to its maximum


def test_caption_file_problems_name_the_line_and_count_each_image_once(folder, tmp_path):
    root, caps = folder
    lines = caps.read_bytes().splitlines(keepends=True)  # rgb.jpg, gray.png, rgba.png, palette.gif

    def load(name, content, skip_bad=False):
        path = tmp_path / name
        path.write_bytes(content)
        return CaptionedImages(str(root), str(path), 16, skip_bad=skip_bad, progress=False), str(path)

    # A UTF-8 byte-order mark (what some editors write first) is no problem.
    data, _ = load("bom.jsonl", b"\xef\xbb\xbf" + b"".join(lines))
    assert len(data) == 4 and data.skipped == 0
    # A byte that is not UTF-8: file and line, or one skipped image (not also "has no caption").
    latin1 = lines[1].replace(b'"gray"', b'"gr\xe9y"')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8 \(byte 0xe9 at column \d+\); save the file as UTF-8"):
        load("latin1.jsonl", b"".join([lines[0], latin1, *lines[2:]]))
    data, _ = load("latin1.jsonl", b"".join([lines[0], latin1, *lines[2:]]), skip_bad=True)
    assert data.skipped == 1 and "gray.png" not in data.files and len(data) == 3
    # A null caption is a missing one, never the caption "None"; an empty one counts once.
    for name, value in (("null", b"null"), ("empty", b'""')):
        bad = lines[0].replace(b'"a red picture"', value)
        with pytest.raises(ValueError, match=rf"rgb\.jpg: {name} caption \(.*:1\)  \(1 problem"):
            load(f"{name}.jsonl", b"".join([bad, *lines[1:]]))
        data, _ = load(f"{name}.jsonl", b"".join([bad, *lines[1:]]), skip_bad=True)
        assert data.skipped == 1 and "rgb.jpg" not in data.files and "None" not in data.captions
    # Two lines for one image: which is right? Reported with both lines, and skipped by flag.
    twice = b"".join(lines) + json.dumps({"file": "gray.png", "caption": "another caption"}).encode() + b"\n"
    with pytest.raises(ValueError, match=r"gray\.png: captioned on more than one line \(.*:2 and .*:5\)"):
        load("twice.jsonl", twice)
    data, _ = load("twice.jsonl", twice, skip_bad=True)
    assert data.skipped == 1 and "gray.png" not in data.files
