"""One run per output name, and no run silently replaces another run's files.

While a run trains, `<output_dir>/<output_name>.lock` holds its PID, host and start time. It is
created with O_CREAT | O_EXCL, which is atomic on Windows and POSIX alike (no fcntl); a second
run is refused with the first one's PID, a lock whose process is gone is taken over. Before the
model loads, a run also refuses to replace a LoRA that another run saved under its name (the
`ss_session_id` metadata differs), or to leave another run's `-state` folder beside its own files,
unless `overwrite = true`. A resumed run keeps its session id, so it goes on replacing its own files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..atomic import replace_file
from ..config import TrainConfig
from ..errors import ConfigError, TrainingError
from ..processes import pid_alive
from .state import read_position

log = logging.getLogger("lorakit")

# Lock files that a run of this process is training into right now (see _holder_is_running).
_TRAINING: set[Path] = set()


# --- the lock file ------------------------------------------------------------------------------
def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _holder_is_running(path: Path, holder: dict) -> bool:
    if not holder:  # empty or unreadable: being written right now, or left half-written by a crash
        try:
            return time.time() - path.stat().st_mtime < 10
        except OSError:
            return False
    if holder.get("host") != socket.gethostname():
        return True  # a run on another computer (a shared folder): its PID means nothing here
    pid = int(holder.get("pid", 0))
    if pid == os.getpid():  # a trainer of this process that was built but is not training
        return path in _TRAINING
    return pid_alive(pid)


def _held_message(path: Path, holder: dict) -> str:
    if not holder:
        who = "another training run (its lock file is being written)"
    else:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        who = f"another training run: PID {holder.get('pid')} on {holder.get('host')}, started {started}"
    return (
        f"output_name {path.stem!r} in {path.parent} is in use by {who}. Two runs with the same "
        "output name would overwrite each other's files: wait for it to finish, stop it, or choose "
        f"another output_name. If no such run is going on, delete {path}."
    )


def _take_over_stale(path: Path, holder: dict) -> None:
    # Renamed aside and checked, not deleted: a run that took the stale lock over between our read
    # and now keeps its lock.
    aside = path.with_name(f".{path.name}.{os.getpid()}.stale")
    try:
        replace_file(path, aside)  # on Windows, waits out another run reading it
    except FileNotFoundError:
        return
    if _read(aside) != holder:  # someone's live lock: put it back, unless a newer one took its place
        if path.exists():
            aside.unlink(missing_ok=True)
        else:
            replace_file(aside, path)
        return
    aside.unlink(missing_ok=True)
    if holder:
        log.warning(
            "took over %s: the run that left it (PID %s on %s) is no longer running",
            path,
            holder.get("pid"),
            holder.get("host"),
        )


@dataclass
class OutputLock:
    path: Path
    token: str  # tells this lock from a later one of the same name

    @classmethod
    def acquire(cls, output_dir: str | Path, output_name: str) -> OutputLock:
        path = Path(output_dir).absolute() / f"{output_name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        mine["token"] = uuid.uuid4().hex
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(path)
                if _holder_is_running(path, holder):
                    raise TrainingError(_held_message(path, holder)) from None
                _take_over_stale(path, holder)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(mine, f)
            return cls(path, mine["token"])
        raise TrainingError(f"could not take the lock {path}: other runs keep taking it; try again")

    def is_held(self) -> bool:
        return _read(self.path).get("token") == self.token

    def release(self) -> None:
        """Delete the lock file if it is still this lock (idempotent)."""
        if not self.is_held():
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError as e:  # Windows: another process is reading it this instant
            log.warning("could not remove the lock file %s (%s): delete it by hand", self.path, e)

    @contextmanager
    def training(self) -> Iterator[None]:
        """Held while a run trains, released at the end however it ends."""
        if not self.is_held():  # another trainer built in this process took it over meanwhile
            self.token = OutputLock.acquire(self.path.parent, self.path.stem).token
        _TRAINING.add(self.path)
        try:
            yield
        finally:
            _TRAINING.discard(self.path)
            self.release()


# --- files of other runs ------------------------------------------------------------------------
def run_session_id(cfg: TrainConfig) -> str | None:
    """The ss_session_id a resumed run keeps (that of the run it continues); None for a new run,
    whose new id matches no file yet."""
    o = cfg.output
    if not o.resume:
        return None
    state = Path(o.resume)
    session = read_position(state).session_id
    if not session and state.name.endswith("-state"):  # a state from before states kept it: ask its LoRA
        session = _lora_session(state.with_name(f"{state.name[: -len('-state')]}.{o.save_model_as}"))[0]
    return session or None


def _lora_session(path: Path) -> tuple[str | None, str]:
    """(its ss_session_id or None, a short description) of a LoRA file."""
    from ..errors import ModelError
    from ..models.checkpoint import safetensors_header

    try:
        meta = safetensors_header(path).metadata
    except ModelError:  # unreadable or not safetensors: certainly not this run's
        return None, "unreadable as safetensors"
    sid = meta.get("ss_session_id")
    if sid is None:
        return None, "no ss_session_id metadata: saved with no_metadata or by another tool"
    what = f"session {sid}"
    if meta.get("ss_steps"):
        what += f", {meta['ss_steps']} steps"
    if meta.get("ss_training_finished_at"):
        try:
            finished = time.localtime(float(meta["ss_training_finished_at"]))
            what += f", saved {time.strftime('%Y-%m-%d %H:%M', finished)}"
        except ValueError:
            pass
    return sid, what


def _state_session(folder: Path) -> tuple[str | None, int | None]:
    try:
        pos = read_position(folder)
    except (ConfigError, TypeError, ValueError, OSError):  # not a state, or one this version cannot read
        return None, None
    return pos.session_id or None, pos.step


def _same_run(found: str | None, mine: str | None) -> bool:
    return mine is not None and found == mine  # an unknown session is never this run's


def check_output_name(cfg: TrainConfig, session_id: str | None, main_process: bool = True) -> None:
    """Refuse to replace another run's final LoRA, or to leave another run's states beside this
    run's files, unless overwrite = true (then the other run's states are removed)."""
    o = cfg.output
    out = Path(o.output_dir)
    if not out.is_dir():
        return
    how = "set overwrite = true (--overwrite) to replace them, or choose another output_name"
    final = out / f"{o.output_name}.{o.save_model_as}"
    if final.is_file():
        sid, what = _lora_session(final)
        if not _same_run(sid, session_id):
            if not o.overwrite:
                raise ConfigError(
                    f"{final} is the LoRA of another training run ({what}); this run would replace it. "
                    "Set overwrite = true (--overwrite) to replace it, or choose another output_name."
                )
            log.warning("overwrite = true: %s, the LoRA of another run (%s), will be replaced", final, what)

    name = re.escape(o.output_name)
    resume = Path(o.resume).absolute() if o.resume else None
    states, epoch_loras = [], []
    for entry in sorted(out.iterdir()):
        if re.fullmatch(rf"{name}(-\d+)?-state", entry.name) and entry.is_dir():
            if entry.absolute() != resume and not _same_run(_state_session(entry)[0], session_id):
                states.append(entry)
        elif re.fullmatch(rf"{name}-\d+\.{re.escape(o.save_model_as)}", entry.name) and entry.is_file():
            if not _same_run(_lora_session(entry)[0], session_id):
                epoch_loras.append(entry.name)
    if states and not o.overwrite:
        listed = "; ".join(f"{s} (step {_state_session(s)[1]})" for s in states)
        raise ConfigError(
            f"another training run left its saved state under this output_name: {listed}. This run "
            f"would leave it beside its own LoRA, where resuming from it continues that other run. "
            f"Resume that run with --resume {states[-1]}, or {how} (its states are then deleted)."
        )
    for state in states:
        if main_process:
            shutil.rmtree(state)
            log.warning("overwrite = true: removed %s, the saved state of another run", state)
    if epoch_loras:
        log.warning(
            "%d LoRA file(s) of another run share this output name (%s); this run replaces those of "
            "the epochs it saves",
            len(epoch_loras),
            ", ".join(epoch_loras[:3]) + (", ..." if len(epoch_loras) > 3 else ""),
        )


def is_main_launch_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (they set RANK), or a plain single process; known
    before accelerate starts."""
    return int(os.environ.get("RANK", "0")) == 0


def claim_output_name(cfg: TrainConfig, session_id: str | None) -> OutputLock | None:
    """Lock the output name (only the main process, under torchrun / accelerate launch), then check
    what is there. Every process runs the checks, so all of them stop together."""
    main_process = is_main_launch_process()
    lock = OutputLock.acquire(cfg.output.output_dir, cfg.output.output_name) if main_process else None
    try:
        check_output_name(cfg, session_id, main_process)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock
