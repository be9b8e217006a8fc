"""
Files in and out, for every script: nothing is ever half-written, and a bad file or flag is one
line that names it and the fix. It imports nothing of the project, so any file can use it.

    UserError        a problem with what the user gave (a flag, a file); the scripts print its
                     message as one line, `error: ...`, and exit with status 2 (run_main; a bad
                     flag value: flag_error, and check_ranges for the usual ranges; check_output
                     for an output path that could not be written at the end)
    atomic_write     a file is always its old content or all of the new: temp file, fsync, rename;
                     a full disk says so, names the file, and leaves no temp file behind
                     (write_json, write_jsonl, write_text, write_arrays: the usual formats through it)
    NpyRows          a .npy written row by row, by several ranks at once: caches larger than memory
    append_jsonl     a row at the end of a log; truncate_log cuts a log back to a checkpoint's step
    save_checkpoint  a checkpoint, atomically; load_checkpoint reads it back, or says in one line
                     what the file is instead
    load_config      a model's config.json into its config dataclass, or one line naming the file
                     (saved_kind: whether it is a DiT's or a tokenizer's)
    load_weights     safetensors weights into a model, or one line naming the first tensor that differs
    file_digest      a file's sha256: which weights a DiT was trained against
    json_digest      the sha256 of a JSON-able value: the key of a cache built from it
    claim_out        train.py's --out: a run in it is never replaced without --resume or --overwrite
    lock_out         train.py's --out is one run's at a time: a lock file (pid, host) held for the run
    check_resume     before any work, that --resume has a checkpoint of this stage to continue
    read_checkpoint  the checkpoint --resume continues, once it fits the flags, or one line saying why not
"""
import errno
import hashlib
import io
import json
import os
import pickle
import socket
import sys
from dataclasses import fields

import numpy as np
import torch


class UserError(ValueError):
    """Bad input a person can fix: a flag's value, a file's content. The message is one line
    that names the flag or file, the value and the fix. Every other exception is a bug in this
    code and keeps its traceback."""


class MissingFile(UserError, FileNotFoundError):
    """A file, folder or model that is not where the user said (or not reachable offline)."""


class DiskFull(UserError, OSError):
    """A write that ran out of space; the file written keeps its previous content."""


def run_main(main):
    """A script's entry point: runs main(); a UserError becomes `error: <message>` on stderr and
    exit status 2 (argparse's status for bad flags), without a traceback. Ctrl-C is one line too,
    `interrupted`, with what the KeyboardInterrupt says (train.py: the step and how to resume),
    and the shell's status for it, 130."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        sys.exit(130)


def flag_error(parser, message: str):
    """Exits as parser.error does (status 2), with the one line only: argparse's usage dump above
    it would bury it."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def flag_text(args, name: str) -> str:
    """'--batch-size 0': how an error names a flag (args' attribute `name`) and its value."""
    return f"--{name.replace('_', '-')} {getattr(args, name)}"


def check_ranges(parser, args, at_least_1=(), not_negative=(), positive=(), below_1=()):
    """Refuses (flag_error) the first of the named flags whose value no run can use: counts and
    sizes below 1, weights and step numbers below 0, rates of 0 or less (None, "the default",
    passes), betas and decays outside [0, 1). Every script checks its flags here, before any
    work, so the same mistake reads the same in each."""
    rules = ((at_least_1, lambda v: v < 1, "must be at least 1"),
             (not_negative, lambda v: v is not None and v < 0, "must not be negative"),
             (positive, lambda v: v is not None and v <= 0, "must be positive"),
             (below_1, lambda v: not 0 <= v < 1, "must be in [0, 1)"))
    for names, bad, rule in rules:
        for name in names:
            if bad(getattr(args, name)):
                flag_error(parser, f"{flag_text(args, name)}: {rule}")


def check_output(parser, flag: str, path: str, folder: bool = False) -> None:
    """Refuses (flag_error), before any work, an output path that could not be written at the end:
    a file's path that is a folder (a folder's, with folder=True, that is a file), or one whose
    nearest existing folder is a file or not writable. A missing folder is fine: atomic_write
    (or the script) makes it."""
    if path is None:
        return
    if not folder and os.path.isdir(path):
        flag_error(parser, f"{flag} {path} is a folder; give the path of a file in it")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        flag_error(parser, f"{flag} {path} is a file, not a folder; fix the path")
    probe = os.path.abspath(path) if folder else os.path.dirname(os.path.abspath(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        flag_error(parser, f"{flag} {path}: {probe} is a file, not a folder; fix the path")
    if not os.access(probe, os.W_OK):
        flag_error(parser, f"{flag} {path}: the folder {probe} is not writable; pick another place")


def first_line(e: BaseException, limit: int = 160) -> str:
    """An exception's class and the first sentence of its message, for quoting inside one line."""
    text = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:limit]
    return f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__


#################################################################################
#                                    Writing                                    #
#################################################################################

def atomic_write(path: str, write, shared: bool = False) -> None:
    """
    write(tmp) writes the new content into the temporary path `tmp` beside `path`; it is then
    flushed to the disk (fsync, so a power cut after the rename cannot leave an empty file) and
    renamed over `path` (atomic on POSIX), in a folder made if missing. Any failure, Ctrl-C
    included, removes the temporary file and leaves `path` as it was; a full disk is a DiskFull
    naming the file. A kill -9 can leave the temporary file, which the next write of `path`
    replaces; with shared=True (a cache that other processes may be filling at the same moment)
    each process writes its own.
    """
    tmp = f"{path}.{os.getpid()}.tmp" if shared else f"{path}.tmp"
    # The folder is made here, so that no output is lost at the end of the work for want of it.
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # ENOSPC from Python's file writes; safetensors' writer (Rust) says it in its message only.
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
            raise DiskFull(f"no space left on the device to write {path} (the previous file, if any, is kept); "
                           f"free some space or point the output elsewhere") from None
        raise


def write_json(path: str, obj) -> None:
    """A JSON file, written atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)


def write_text(path: str, text: str) -> None:
    """A text file (a table, a README), written atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def write_jsonl(path: str, rows) -> None:
    """A JSON-lines file, one object per line, written atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    atomic_write(path, write)


def append_jsonl(path: str, row: dict) -> None:
    """One object as the last line of a JSON-lines log. Appended, not rewritten: a kill can cut
    off only this line, and truncate_log drops such a line."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_log(path: str, step: int) -> None:
    """Drops the rows of a JSON-lines log whose "step" is past `step`, and a last line cut off by a
    kill: a resumed run replays the steps after its checkpoint and logs them again."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
                if row["step"] <= step:
                    keep.append(row)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    write_jsonl(path, keep)  # json.dumps of a parsed json.dumps line is that line again


def write_arrays(path: str, arrays, shared: bool = False) -> None:
    """numpy arrays, written atomically: one array as .npy (np.save), a dict of them as .npz
    (np.savez). Written through a file object: given a name, numpy would add its own suffix
    to the temporary path."""
    def write(tmp):
        with open(tmp, "wb") as f:
            if isinstance(arrays, dict):
                np.savez(f, **arrays)
            else:
                np.save(f, arrays)
    atomic_write(path, write, shared)


class NpyRows:
    """
    `with NpyRows(path, shape, dtype, header) as f: f.write(row, rows)`: a .npy file of a known shape
    filled row by row, never held whole in memory, by one process or by several at once (the ranks,
    each writing its own rows; the one with header=True writes np.save's header and the full length).
    The file is byte for byte what np.save writes of the same array. Written by position, not through
    a memory map: on a filesystem several machines share (NFS), a map writes back whole 4 kB pages,
    and the page two ranks' rows share would keep only one rank's. Closing flushes it to the disk.
    """

    def __init__(self, path: str, shape: tuple, dtype, header: bool):
        self.path, self.dtype = path, np.dtype(dtype)
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                    "fortran_order": False, "shape": tuple(shape)})
        self.start, self.row_bytes = len(head.getvalue()), self.dtype.itemsize * int(np.prod(shape[1:]))
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # never truncated: other ranks may be writing
        if header:
            self._put(head.getvalue(), 0)
            os.ftruncate(self.fd, self.start + self.row_bytes * shape[0])  # its full length, rows still zero

    def write(self, row: int, rows) -> None:
        """Rows row, row + 1, ... of the array from `rows` (an array of the file's dtype and row shape)."""
        self._put(np.ascontiguousarray(rows, self.dtype).tobytes(), self.start + row * self.row_bytes)

    def _put(self, data: bytes, at: int) -> None:
        view = memoryview(data)
        try:
            while view:  # pwrite may write less than asked (a signal); the rest goes in the next call
                n = os.pwrite(self.fd, view, at)
                view, at = view[n:], at + n
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DiskFull(f"no space left on the device to write {self.path}; free some space or point "
                               f"the cache elsewhere") from None
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                os.fsync(self.fd)  # this process's rows are on the disk before it says they are done
        finally:
            os.close(self.fd)
        return False


def save_checkpoint(state: dict, path: str) -> None:
    """Atomic: a crash or a full disk mid-write leaves the previous checkpoint and no temp file.
    Tensors and plain types only, so torch.load(weights_only=True) reads it (house rule 7)."""
    def write(tmp):
        with open(tmp, "wb") as f:  # through a Python file, so that a full disk is an OSError(ENOSPC)
            torch.save(state, f)
    atomic_write(path, write)


#################################################################################
#                                    Reading                                    #
#################################################################################

def load_checkpoint(path: str, need: tuple, fix: str, device="cpu", mmap: bool = False) -> dict:
    """
    A checkpoint train.py wrote (tensors and plain types only, so torch.load(weights_only=True)
    reads it without running any code), holding the keys `need`. Anything else is a UserError
    that names the file, says what it is instead, and ends with `fix`.
    """
    if not os.path.isfile(path):
        raise MissingFile(f"{path} not found; {fix}")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path} is empty (0 bytes); {fix}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise UserError(f"{path} is damaged or not a PyTorch checkpoint ({first_line(e)}); {fix}") from None
        # torch refused to build a Python object: the file was pickled by other code. Loading it
        # anyway could run that code, so it is not offered.
        raise UserError(f"{path} is not a checkpoint of this project: it holds Python objects besides tensors "
                        f"and plain types (train.py's checkpoints never do), and is not loaded; {fix}") from None
    except Exception as e:  # a cut-off zip, a text file, ...
        raise UserError(f"{path} is truncated, damaged or not a PyTorch checkpoint ({first_line(e)}); {fix}") from None
    missing = [k for k in need if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a train.py checkpoint (it has no {missing[0]!r}); {fix}")
    return ckpt


def saved_kind(path: str):
    """Which model a config.json was saved with: "dit" (its settings under 'config', beside the
    'meta'), "tokenizer" (TexTok's settings at the top), or None (not JSON, or neither)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(raw, dict) and "config" in raw and "meta" in raw:
        return "dit"
    return "tokenizer" if isinstance(raw, dict) and "num_tokens" in raw and "patch_size" in raw else None


def load_config(config_cls, path: str, part: str = None):
    """The config dataclass `config_cls` from the JSON file `path` (from its key `part`, if given).
    Keys the dataclass lacks are ignored (files of older or newer versions); a file that is not
    JSON, a value of the wrong type, or a value the dataclass refuses is one line naming the file."""
    fix = "restore the config.json saved with these weights, or save the model again"
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        what = "empty" if isinstance(e, json.JSONDecodeError) and not e.doc.strip() else f"not valid JSON ({e})"
        raise UserError(f"{path} is {what}; {fix}") from None
    if part is not None:
        raw = raw.get(part) if isinstance(raw, dict) else None
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a JSON object of {config_cls.__name__} settings" +
                        (f" under {part!r}" if part else "") + f"; {fix}")
    values = {}
    for field in fields(config_cls):
        if field.name in raw:
            v, want = raw[field.name], type(field.default)
            if not (isinstance(v, want) and not isinstance(v, bool) or want is float and type(v) is int):
                raise UserError(f"{path}: {field.name} is {v!r}, but it must be {want.__name__}; {fix}")
            values[field.name] = v
    try:
        return config_cls(**values)
    except UserError as e:
        raise UserError(f"{path}: {e}; {fix}") from None


def load_weights(model: torch.nn.Module, weights: str, config: str, device="cpu") -> None:
    """Loads a safetensors file into `model`, built from `config`. A file that does not read, or
    whose tensors do not fit the model the config describes (a config edited to another shape,
    or copied from other weights), is one line naming the first tensor that differs."""
    from safetensors.torch import load_file
    try:
        state = load_file(weights, device=str(device))
    except Exception as e:
        raise UserError(f"{weights} is truncated or not a safetensors file ({first_line(e)}); save the model "
                        f"again (train.py writes it at the end of a run)") from None
    fix = f"{config} does not describe these weights: restore the config.json saved with them"
    expected = model.state_dict()
    for k, v in expected.items():
        if k not in state:
            raise UserError(f"{weights} has no tensor {k!r}, which the model of {config} needs; {fix}")
        if state[k].shape != v.shape:
            raise UserError(f"{weights}: {k} has shape {tuple(state[k].shape)}, but the model of {config} needs "
                            f"{tuple(v.shape)}; {fix}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise UserError(f"{weights} has a tensor {extra[0]!r} that the model of {config} lacks; {fix}")
    model.load_state_dict(state)


def file_digest(path: str) -> str:
    """sha256 of a file, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def json_digest(obj) -> str:
    """sha256 of a JSON-able value (as json.dumps writes it): a cache built from the value is
    named by it, so a change to any of its parts (captions, encoder, weights) misses the cache."""
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


#################################################################################
#          A training run's folder: never replaced, resumed if it fits          #
#################################################################################
# train.py's --out and its flags (--resume, --overwrite, --stage, --steps): what the user gave is
# checked here, as the other files are, so train.py reads as training only.

RUN_FILES = ("ckpt-latest.pt", "tokenizer", "dit")  # what a run leaves in its --out


def claim_out(args, master: bool) -> None:
    """A fresh run never replaces one silently: an --out that holds a run needs --resume (continue
    it) or --overwrite (start it over, with a new log)."""
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(args.out, name))]
    if found and not (args.resume or args.overwrite):
        raise UserError(f"{args.out} already holds a run ({os.path.join(args.out, found[0])}); pass --resume to "
                        f"continue it, --overwrite to start it over, or another --out")
    log_path = os.path.join(args.out, "log.jsonl")
    if args.overwrite and master and os.path.exists(log_path):
        os.remove(log_path)


class lock_out:
    """
    `with lock_out(folder):` holds <folder>/run.lock, which names this process (pid and host), for
    the length of a run: a second run into the same --out is refused in one line naming the first
    (it would have overwritten its checkpoints and log mid-run). The lock goes on exit and on any
    exception, Ctrl-C included; after a kill -9 it stays, and the next run takes it over once its
    pid is no longer running (on this host: another host's pid cannot be checked).
    """

    def __init__(self, folder: str):
        self.path, self.held = os.path.join(folder, "run.lock"), False

    def __enter__(self):
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):  # a second try after taking over a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: one process wins
            except FileExistsError:
                try:
                    with open(self.path) as f:
                        other = json.load(f)
                    pid, host = int(other["pid"]), str(other["host"])
                except (OSError, ValueError, KeyError, TypeError):  # cut off as it was written, or gone since
                    pid, host = None, me["host"]
                # Our own pid in it is a lock left by a killed run whose pid this process now has (a container).
                if host == me["host"] and (pid is None or pid == me["pid"] or not pid_running(pid)):
                    try:
                        os.remove(self.path)  # stale: its run is gone
                    except FileNotFoundError:
                        pass
                    continue
                raise UserError(f"{os.path.dirname(self.path)} is in use by another run (pid {pid} on {host}, "
                                f"{self.path}); wait for it to end or stop it, or pass another --out (if no run "
                                f"is going on {host}, delete {self.path})") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise UserError(f"could not take {self.path}: another run keeps taking it; pass another --out")

    def __exit__(self, *exc):
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        return False


def pid_running(pid: int) -> bool:
    """Whether a process of this id runs on this machine (signal 0 checks without sending one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: running
        return True
    return True


RESUME_FIX = "nothing to resume: drop --resume (adding --overwrite to start over in this --out), or fix --out"


def check_resume(path: str, args) -> None:
    """What --resume needs, checked before any work (a caption cache can take minutes): a
    checkpoint that reads, of this --stage, not past --steps. Memory-mapped: the tensors are
    not read. read_checkpoint, once the model is built, checks that it fits the model too."""
    ckpt = load_checkpoint(path, ("step", "args", "config", "rng_cpu", "rng_cuda"), fix=RESUME_FIX, mmap=True)
    if ckpt["args"].get("stage", "tokenizer") != args.stage:
        raise UserError(f"{path} is a --stage {ckpt['args'].get('stage')} checkpoint; fix --out or --stage")
    if ckpt["step"] > args.steps:
        raise UserError(f"{path} is at step {ckpt['step']}, past --steps {args.steps}; pass --steps "
                        f"{ckpt['step']} or more to resume it")


def read_checkpoint(path: str, args, device, master: bool, config: dict) -> dict:
    """The checkpoint to resume from, once it fits: its stage, its step, the model `config` describes
    (one line, not a size mismatch per tensor). Warns of changed flags; cuts the log to its step."""
    check_resume(path, args)
    ckpt = load_checkpoint(path, ("step", "args", "config", "rng_cpu", "rng_cuda"), device=device, fix=RESUME_FIX)
    differ = [k for k in config if ckpt["config"].get(k) != config[k]]
    if differ:
        saved = ", ".join(f"{k}={ckpt['config'].get(k)!r}" for k in differ)
        now = ", ".join(f"{k}={config[k]!r}" for k in differ)
        raise UserError(f"{path} holds a model with {saved}, but these flags build one with {now}; resume "
                        f"with the flags it was trained with (see {os.path.join(args.out, 'args.json')}), or "
                        f"start over with --overwrite or another --out")
    # Flags a resume may change without changing what is trained: the budget, the cadence, the workers.
    free = ("resume", "overwrite", "steps", "eval_every", "save_every", "keep_every", "log_every", "num_workers")
    changed = {k: (v, vars(args)[k]) for k, v in ckpt["args"].items() if k in vars(args) and vars(args)[k] != v
               and k not in free}
    if changed and master:
        print(f"warning: resuming {path} with changed flags (saved, now): {changed}")
    # A checkpoint older than a flag trained with that flag's earlier behaviour: say which flags it does
    # not record and the values the resume applies, so a resume that now trains differently is seen.
    newer = {k: v for k, v in vars(args).items() if k not in ckpt["args"] and k not in free}
    if newer and master:
        print(f"warning: {path} predates these flags, which the resume applies: {newer}; to train on as "
              f"it did, pass each flag's earlier value (docs/training.md)")
    if master:
        truncate_log(os.path.join(args.out, "log.jsonl"), ckpt["step"])
    return ckpt
