import json
import os
import sys

# The project is flat scripts at the repository root; make them importable from tests/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub


def kill_after_checkpoint(monkeypatch, train_module, at_step):
    """Makes train.save_checkpoint raise KeyboardInterrupt right after it has written the
    checkpoint of step `at_step`, as if the run were killed there. Returns the real function,
    to put back before resuming."""
    save = train_module.save_checkpoint

    def save_then_die(state, path):
        save(state, path)
        if state["step"] == at_step:
            raise KeyboardInterrupt("killed")
    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    return save


def captioned_folder(tmp_path, n, color, caption, size=(20, 20)):
    """n flat-coloured images in tmp_path/imgs (image i is NN.png, of colour color(i)) and their
    JSON-lines caption file tmp_path/caps.jsonl (image i captioned caption(i)): a real-data
    folder as train.py, eval_fid.py and reproduce.py read one. Returns (folder, caption file)."""
    from PIL import Image
    root, lines = tmp_path / "imgs", []
    os.makedirs(root)
    for i in range(n):
        Image.new("RGB", size, color(i)).save(root / f"{i:02d}.png")
        lines.append(json.dumps({"file": f"{i:02d}.png", "caption": caption(i)}))
    (tmp_path / "caps.jsonl").write_text("\n".join(lines) + "\n")
    return root, tmp_path / "caps.jsonl"
