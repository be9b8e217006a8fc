import json
import os
import subprocess
import sys

import torch

# The project is flat scripts at the repository root; make them importable from tests/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# Runs train.main with every AdamW step first saving the gradients it is given to <out>/grads-<rank>.pt, a
# list of one list per step in its parameters' order (a one-step run: TexTok's step, then the discriminator's).
RECORD = """
import os, sys, torch
sys.path.insert(0, os.getcwd())
import train
grads, adamw_step = [], torch.optim.AdamW.step
def step(opt, *a, **k):
    grads.append([p.grad.detach().clone() for g in opt.param_groups for p in g["params"]])
    out = sys.argv[sys.argv.index("--out") + 1]
    torch.save(grads, os.path.join(out, f"grads-{os.environ.get('RANK', '0')}.pt"))
    return adamw_step(opt, *a, **k)
torch.optim.AdamW.step = step
train.main(sys.argv[1:])
"""


def first_gradients(out, cache, *flags, ranks=1, port=29531):
    """The first step's gradients of each optimizer in a train.py run (rank 0's: DDP gives every rank
    the all-reduced ones), and the run's logged first-step losses."""
    argv = [*flags, "--out", str(out), "--cache-dir", str(cache)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", RECORD, *argv]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={port}",
               "--no-python", *cmd]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(os.path.join(out, "grads-0.pt")), train_losses(out)


def train_losses(out):
    """The training rows of a run's log.jsonl."""
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def assert_same_gradients(a, b, rel=1e-5):
    """Every optimizer's gradients equal, each tensor to `rel` of that optimizer's whole gradient norm:
    what is compared is the step, not rounding-level gradients that Adam would blow up to a full lr."""
    assert len(a) == len(b)
    for ga, gb in zip(a, b):
        scale = torch.cat([g.flatten() for g in ga]).norm()
        assert scale > 0
        for i, (x, y) in enumerate(zip(ga, gb)):
            assert (x - y).norm() <= rel * scale, f"tensor {i}: |diff| {(x - y).norm():.3g}, |grad| {scale:.3g}"
