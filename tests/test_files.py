"""What files.py promises: a bad input is one line a person can act on (no traceback), a file
is never half-written, and a checkpoint that is not one says what it is instead."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("argv, says", [
    (["train.py", "--data", "no-such-folder", "--captions", "c.jsonl"], "image folder no-such-folder does not exist; fix --data"),
    (["sample.py", "--dit", "no-such.pt"], "no-such.pt not found"),
    (["eval_fid.py", "gen", "no-such.npz", "ref.npz"], "no-such.npz not found"),
    (["caption.py", "no-such-folder"], "image folder no-such-folder does not exist"),
])
def test_a_user_error_is_one_line_without_a_traceback(tmp_path, argv, says):
    run = subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], cwd=tmp_path,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and run.stderr.startswith("error: "), run.stderr
    assert says in run.stderr


@pytest.mark.parametrize("script, flags, says", [
    ("sample", ["--steps", "0"], "--steps 0: must be in 1..1000"),  # the sampler's traceback before
    ("sample", ["--per-row", "0"], "--per-row 0: must be at least 1"),
    # PIL's "unknown file extension" traceback after all the sampling before
    ("sample", ["--out", "grids/run1"], "--out grids/run1: the grid is a .png or .jpg; end the path with .png"),
    ("sample", ["--num-samples", "8", "--out", "s.png"], "--out s.png: --num-samples writes an .npz; end the path with .npz"),
    ("eval_fid", ["--batch-size", "0", "gen", "s.npz", "r.npz"], "--batch-size 0: must be at least 1"),
    ("eval_fid", ["gen", "s.npz", "r.npz", "--k", "0"], "--k 0: must be at least 1"),
    ("caption", ["images", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
])
def test_unusable_flags_are_one_line_at_parse_time(script, flags, says, capsys):
    import importlib
    with pytest.raises(SystemExit) as exit:
        importlib.import_module(script).get_args(flags)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.strip().splitlines() == [err.strip()] and f"error: {says}" in err
