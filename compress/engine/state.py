"""A run's state on disk: OUTPUT.partial/ (checkpoints, the MLflow run id, a lock), resume checks, and the atomic
rename that makes OUTPUT appear only when the run has finished."""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
import torch

from compress.infra.errors import CompressError
from compress.infra.paths import check_output, check_overwrite, share_like_open
from compress.infra.tracking import shown


# What a resumed run may change: where and how it runs and is saved, not what it learns.
# --data, --text_column, --label_column and --teacher_cache as typed may change (another working folder, a column
# named that was found before): the rows and the weights they lead to are what must match (`inputs`)
RESUMABLE_CHANGES = frozenset({"accelerator", "devices", "strategy", "precision", "compile", "num_workers",
                               "checkpoint_every", "checkpoint_minutes", "latency_reps", "data", "text_column",
                               "label_column", "teacher_cache"})


# Params that are no flag of their own, by the flag that sets them.
_DERIVED = {"command": "the command", "task": "--task/--data", "train_rows": "training rows", "dev_rows": "dev rows",
            "metric": "the metric", "num_labels": "labels", "teacher_path": "--teacher", "model_path": "--model",
            "teacher_layers_kept": "--layers", "student": "--student"}


def _shown(value) -> str:
    return "unset" if value in (None, "") else str(value)


class RunState:
    """OUTPUT.partial/: checkpoints plus a small JSON of what must survive a crash (the MLflow run id, the params)."""

    def __init__(self, output: Path, resume: bool, overwrite: bool) -> None:
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        output = Path(os.path.normpath(output))
        self.output = output
        self.dir = self.partial(output)
        self.ckpt_dir = self.dir / "checkpoints"
        self._meta = self.dir / "run.json"
        # A DDP child process (Lightning re-runs the command with LOCAL_RANK set) finds rank 0's OUTPUT.partial: it
        # only helps with fit, so it neither checks nor writes the folder, and reads rank 0's run id from it.
        self._child = rank_zero_only.rank != 0
        self._lock = None  # OUTPUT.partial/lock, taken at the first write (rank 0 only)
        self.nothing_left = False
        if self._child:
            return
        check_output(output)
        check_overwrite(output, overwrite)
        if (holder := lock_holder(self.dir / "lock")) is not None:  # before --overwrite could delete a live run's work
            raise CompressError(f"--output {output}: another compress process ({holder}) is writing it now; wait for "
                                "it to finish, or choose another --output")
        if self.dir.exists() and not resume:
            if not overwrite:
                raise CompressError(
                    f"--output {output}: an interrupted run left {self.dir}; pass --resume to continue it "
                    "or --overwrite to start over"
                )
            shutil.rmtree(self.dir)
        # A stop before the run's first write leaves nothing to resume, and the stop's last line still says
        # --resume (it cannot know): the run starts as new (run_training says so) rather than refuse.
        self.nothing_left = resume and not self.dir.exists()

    @staticmethod
    def partial(output: Path) -> Path:
        """Where a run writing `output` keeps its checkpoints and record until it finishes."""
        output = Path(os.path.normpath(output))
        return output.with_name(output.name + ".partial")

    @classmethod
    def left_at(cls, output: Path) -> dict:
        """The record of an interrupted run at `output`, or {} when none was left; read without taking the folder,
        so a caller can decide whether to resume it before a RunState checks it."""
        meta = cls.partial(output) / "run.json"
        return json.loads(meta.read_text()) if meta.is_file() else {}

    def read(self) -> dict:
        return json.loads(self._meta.read_text()) if self._meta.exists() else {}

    def write(self, **values) -> None:
        if self._child:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._lock is None:
            self._lock = _take_lock(self.dir / "lock")
            if self._lock is None:
                raise CompressError(f"--output {self.output}: another compress process "
                                    f"({lock_holder(self.dir / 'lock')}) started writing it; choose another --output")
        self._meta.write_text(json.dumps(self.read() | values, default=str))  # params may hold paths

    def check_resume(self, params: dict, inputs: dict) -> None:
        """Refuse to resume another run. Lightning would restore the old optimizer and schedule over new flags (a new
        --lr is lost; a new --batch_size resumes at the wrong batch), a student of another shape fails to load, MLflow
        refuses to change a logged param or cannot find the run in another store, and other data or other teacher
        weights under the same names would quietly finish the run on them. `inputs` are what the params cannot show:
        the data's and models' fingerprints and the MLflow store."""
        saved = self.read()
        if saved.get("params") is None:  # nothing recorded yet (killed before its first write)
            return
        hint = "resume with the same flags and files, or drop --resume and pass --overwrite to start over"
        # the flags first: a changed --max_train or --label_column changes the rows too, and is the news
        before, now = saved["params"], json.loads(json.dumps(params, default=str))
        # a param one side lacks was added or dropped by another compress version, not by the user
        changed = sorted((k for k in set(before) & set(now)
                          if k not in RESUMABLE_CHANGES and before.get(k) != now.get(k)),
                         key=lambda k: (k in _DERIVED, k))  # the flags the user typed first
        if changed:
            k = changed[0]
            others = [name for name in dict.fromkeys(_DERIVED.get(c, "--" + c) for c in changed[1:])
                      if name != _DERIVED.get(k, "--" + k)]
            more = f" (also {', '.join(others)})" if others else ""
            raise CompressError(f"--resume: the interrupted run at {self.dir} had {_DERIVED.get(k, '--' + k)} "
                                f"{_shown(before.get(k))}, this one {_shown(now.get(k))}{more}; {hint}")
        for key, now in inputs.items():  # strings: a fingerprint, a URI
            before = saved.get("inputs", {}).get(key)
            if key == "tracking" and before is not None:
                before = shown(before)  # a run.json written before passwords were hidden holds the URL as typed
            if before is None or before == now:
                continue
            if key == "tracking":
                raise CompressError(f"--resume: the interrupted run at {self.dir} logs to --tracking {before}, not "
                                    f"{now}; {hint}")
            what = "the data's rows" if key == "data" else f"the weights in {_DERIVED.get(key, key)}"
            raise CompressError(f"--resume: {what} changed since the interrupted run at {self.dir}; {hint}")

    def last_checkpoint(self) -> str | None:
        """The newest checkpoint that loads; a kill -9 during a write can leave the newest one truncated."""
        for ckpt in sorted(self.ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
                return str(ckpt)
            except Exception:  # a truncated file: fall back to the one before it
                print(f"skipping unreadable checkpoint {ckpt}", file=sys.stderr)
        return None

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):  # -> Self (typing.Self needs Python 3.11; the project runs on 3.10)
        return self

    def __exit__(self, *exc) -> None:
        """Release the lock however the run ends: a failed run in a process that goes on (search's trials, tests)
        must not keep its folder from being resumed."""
        if self._lock:  # False where locks are unsupported
            self._lock.close()
            self._lock = None


# A run holds an flock on OUTPUT.partial/lock while it writes there. The kernel drops it when the process dies, even by
# kill -9, so a lock left behind by a dead run never blocks --resume; a live one stops a second run from writing the
# same checkpoints (or --overwrite from deleting them). Where flock is unavailable (some network file systems), runs
# go unguarded as before.
def _take_lock(path: Path):
    """The open, locked file (kept open for the run), False where locks are unsupported, None if another holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return False
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except OSError:  # ENOLCK and the like: no locking here
        handle.close()
        return False
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    return handle


def lock_holder(path: Path) -> str | None:
    """Who holds the lock at `path` ("pid N on HOST"), or None when no live process does."""
    if not path.is_file():
        return None
    lock = _take_lock(path)
    if lock is None:
        return path.read_text().strip() or "a live run"
    if lock:
        lock.close()  # free: a run that died; its folder is an interrupted run's
    return None


@contextmanager
def atomic_output(output: Path, overwrite: bool):
    """Yield a temporary folder beside `output`; rename it into place only if the block succeeds.

    The temporary and the replaced folders get fresh hidden names, so no folder of the user's that
    happens to be called OUTPUT.tmp or OUTPUT.old is ever deleted."""
    import uuid

    output = Path(os.path.normpath(output))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()  # not mkdtemp, whose 0700 would become the output's mode
    try:
        yield tmp
        share_like_open(*tmp.rglob("*.safetensors"))
        if output.exists() or output.is_symlink():
            if not overwrite or not output.is_dir():  # a file there is not an earlier model: never replace it
                raise CompressError(f"--output {output}: appeared while running; not replacing it")
            old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
            output.rename(old)  # a link is moved, not followed: what it pointed to stays
            tmp.rename(output)
            if old.is_symlink():
                old.unlink()
            else:
                shutil.rmtree(old)
        else:
            tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(model, tokenizer, folder: Path) -> None:
    """HF layout: safetensors, tokenizer, and a config with id2label; loads without compress installed."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
