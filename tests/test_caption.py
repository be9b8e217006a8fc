"""What caption.py promises, with a tiny random vision-language model built from a config (no
download): one well-formed line per image, the word limit, resume after a stop without duplicates
or losses, shards that cover every image once, and held-out class captions kept out of training."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import caption


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A 1-layer BLIP captioner with a 24-word vocabulary, saved like a hub model."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil,
                              BlipProcessor)
    root = tmp_path_factory.mktemp("vlm")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of", "red", "blue", "circle", "square",
             "on", "the", "background", "large", "small", "green", "star", "at", "top", "left", "with", "and"]
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                              tokenizer=BertTokenizer(str(root / "vocab.txt"), model_max_length=256))
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = BlipConfig(vision_config=dict(**small, image_size=32, patch_size=8),
                     text_config=dict(**small, vocab_size=len(words), max_position_embeddings=256, bos_token_id=2,
                                      sep_token_id=3, pad_token_id=0, eos_token_id=3), projection_dim=32)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(cfg)
    with torch.no_grad():  # a larger random output layer, so different images get different captions
        model.text_decoder.cls.predictions.decoder.weight.normal_(0, 2.0)
    path = root / "tiny-blip"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture
def folder(tmp_path):
    """Two class folders with 5 images in all, plus one unreadable file."""
    rng = np.random.default_rng(0)
    for cls, n in (("cats", 3), ("dogs", 2)):
        os.makedirs(tmp_path / "imgs" / cls)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "dogs" / "broken.png").write_bytes(b"not an image")
    return tmp_path / "imgs"


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def run(folder, out, vlm, *extra):
    caption.main([str(folder), "--out", str(out), "--model", vlm, "--batch-size", "2", *extra])


def test_one_line_per_image_with_labels_and_word_limit(folder, tmp_path, tiny_vlm, capsys):
    out = tmp_path / "c.jsonl"
    run(folder, out, tiny_vlm, "--max-words", "3")
    r = rows(out)
    assert sorted(x["file"] for x in r) == ["cats/0.png", "cats/1.png", "cats/2.png", "dogs/0.png", "dogs/1.png"]
    assert {x["file"]: x["label"] for x in r}["dogs/1.png"] == 1 and {x["label"] for x in r} == {0, 1}
    assert all(isinstance(x["caption"], str) and 1 <= len(x["caption"].split()) <= 3 for x in r)
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().out and "broken.png" not in json.dumps(r)
    # train.py reads what caption.py writes (the broken file is skipped there too, by flag).
    from data import CaptionedImages
    data = CaptionedImages(str(folder), str(out), 16, skip_bad=True, progress=False)
    assert len(data) == 5 and data.skipped == 1


def test_resume_after_a_stop_neither_duplicates_nor_loses(folder, tmp_path, tiny_vlm, monkeypatch):
    out = tmp_path / "c.jsonl"
    full = tmp_path / "full.jsonl"
    run(folder, full, tiny_vlm)
    calls = {"n": 0}
    real = caption.Captioner.__call__

    def stop_after_one_batch(self, images):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("stopped")
        return real(self, images)
    monkeypatch.setattr(caption.Captioner, "__call__", stop_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        run(folder, out, tiny_vlm)
    first = out.read_text()
    assert len(rows(out)) == 2
    with open(out, "a") as f:
        f.write('{"file": "cats/2.pn')  # a line cut off mid-write by the kill
    monkeypatch.setattr(caption.Captioner, "__call__", real)
    run(folder, out, tiny_vlm)
    assert out.read_text().startswith(first)  # finished lines are never rewritten
    assert sorted(map(json.dumps, rows(out))) == sorted(map(json.dumps, rows(full)))


def test_two_shards_cover_every_image_once(folder, tmp_path, tiny_vlm):
    out = tmp_path / "c.jsonl"
    run(folder, out, tiny_vlm, "--shard", "0/2")
    run(folder, out, tiny_vlm, "--shard", "1/2")
    a, b = rows(f"{out}.shard-0-of-2"), rows(f"{out}.shard-1-of-2")
    assert not {x["file"] for x in a} & {x["file"] for x in b}
    caption.main([str(folder), "--out", str(out), "--merge"])
    assert sorted(x["file"] for x in rows(out)) == sorted(x["file"] for x in a + b) and len(rows(out)) == 5


def test_held_out_class_captions_are_disjoint_from_training(tmp_path):
    src = tmp_path / "caps.jsonl"
    with open(src, "w") as f:
        for i in range(40):
            f.write(json.dumps({"file": f"{i % 4}/{i}.png", "caption": f"caption number {i}", "label": i % 4}) + "\n")
    caption.main(["--holdout", str(src), "--fraction", "0.2"])
    train, unseen = rows(tmp_path / "caps-train.jsonl"), rows(tmp_path / "caps-unseen.jsonl")
    assert len(train) + len(unseen) == 40 and len(unseen) == 8
    assert not {x["caption"] for x in train} & {x["caption"] for x in unseen}
    assert {x["label"] for x in unseen} == {0, 1, 2, 3}  # every class keeps unseen captions
    import sample
    assert sorted(sample.load_class_captions(str(tmp_path / "caps-unseen.jsonl"))) == [0, 1, 2, 3]


def test_a_model_that_is_not_here_fails_at_once_naming_itself(folder, tmp_path, monkeypatch):
    # Offline, or online without a network, nothing waits on the hub: the model is looked for in
    # the local cache only, and at most one short request asks the hub (transformers' own retries
    # over a dozen files took 2.5 minutes to give up).
    import huggingface_hub
    import huggingface_hub.constants
    import transformers
    local_only, real = [], transformers.AutoProcessor.from_pretrained
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                        lambda name, **kw: (local_only.append(kw.get("local_files_only")), real(name, **kw))[1])

    def hub(answer):
        def model_info(name, timeout=None):
            assert timeout is not None and timeout <= 10
            raise answer
        monkeypatch.setattr(huggingface_hub, "model_info", model_info)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub(AssertionError("offline, the hub is not asked"))
    with pytest.raises(FileNotFoundError, match=r"'no-such/vlm' is not in the local Hugging Face cache, and the "
                                                r"hub is offline \(HF_HUB_OFFLINE=1\)"):
        run(folder, tmp_path / "c.jsonl", "no-such/vlm")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub(ConnectionError("Name or service not known"))
    with pytest.raises(FileNotFoundError, match=r"'no-such/vlm' is not in the local .* hub is unreachable "
                                                r"\(ConnectionError: Name or service not known\)"):
        run(folder, tmp_path / "c.jsonl", "no-such/vlm")
    from types import SimpleNamespace
    hub(huggingface_hub.errors.RepositoryNotFoundError("404", response=SimpleNamespace(headers={}, request=None)))
    with pytest.raises(FileNotFoundError, match=r"no vision-language model 'no-such/vlm' on the Hugging Face hub"):
        run(folder, tmp_path / "c.jsonl", "no-such/vlm")
    assert local_only and all(local_only)  # never a download attempt


def test_a_damaged_caption_file_to_resume_or_merge_is_one_line_naming_the_line(folder, tmp_path):
    # A hand-edited --out (or shard) is read by data.read_jsonl, as every caption file is: a bad
    # line is named by file:line before any model is loaded, not a traceback.
    from files import UserError
    out = tmp_path / "c.jsonl"
    out.write_text('{"file": "cats/0.png", "caption": "a cat"}\n{"file": "cats/1.png", caption: oops}\n')
    with pytest.raises(UserError, match=rf"^{out}:2: not JSON .*; fix or delete that line"):
        run(folder, out, "no-such/vlm")
    shard = tmp_path / "c.jsonl.shard-0-of-1"
    shard.write_bytes(b'{"caption": "no file here"}\n')
    out.write_text("")
    with pytest.raises(UserError, match=rf"^{shard}:1: no 'file'"):
        caption.main([str(folder), "--out", str(out), "--merge"])
