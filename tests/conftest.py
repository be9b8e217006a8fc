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
