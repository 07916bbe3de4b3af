"""Training as a background job: a process of its own that outlives the GUI (or CLI) that started it.

    job = start_job(cfg, "runs")          # returns at once; training runs in `python -m lorakit.train.job`
    job.status()["state"]                 # running | done | stopped | error
    job.progress()                        # the Progress reports so far, as dicts
    job.stop(); job.wait()                # the trainer saves its state and exits ("stopped")
    job2 = job.resume()                   # a new job that continues from the newest saved state

A run folder `<runs_dir>/<YYYYmmdd-HHMMSS>-<output_name>/` holds everything about one job:
`config.toml` (the same TOML `lorakit train --config` reads), `job.json` (when, resumed from what),
`status.json` ({state, message, lora_path, pid}), `progress.jsonl` (one Progress per line) and
`log.txt` (the process's stdout and stderr), `heartbeat` (touched every few seconds while the process
lives) and `stop_requested` (Stop's request). The process is detached (its own session on POSIX, its
own process group and hidden console on Windows), so closing the browser, reloading the page or
restarting the GUI server does not stop it; `find_jobs` / `latest_job` find it again from the folder.

Stop works the same on every system: it creates `stop_requested`, which the trainer checks after each
optimizer step, then saves its state as on Ctrl-C. On POSIX it also sends SIGINT, which stops a job
that is still loading. A job is alive while its process exists and its heartbeat is fresh: no signal
is needed to ask (on Windows `os.kill(pid, 0)` would end it), and a reused pid is not taken for it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .. import processes
from ..atomic import atomic_path, replace_file
from ..config import TrainConfig
from ..errors import LoraKitError, TrainingError

log = logging.getLogger("lorakit")

STATES = ("running", "done", "stopped", "error")
# Options that name files or folders: stored absolute, so the run folder means the same from anywhere.
PATH_OPTIONS = (
    "pretrained_model_name_or_path",
    "train_data_dir",
    "reg_data_dir",
    "output_dir",
    "resume",
    "logging_dir",
    "network_weights",
    "sample_prompts",
)

# What train/state.py's load_state needs (read here without importing torch); the position file last.
STATE_FILES = ("network.safetensors", "optimizer.pt", "train_state.json")

STOP_FILE = "stop_requested"
HEARTBEAT_FILE = "heartbeat"
HEARTBEAT_EVERY_S = 2.0
# Generous: loading torch and a model, or a slow disk, may hold the heartbeat thread back a while.
HEARTBEAT_STALE_S = 60.0

_TQDM_BAR = re.compile(r"\r?[^\r\n]*?\d+%\|[^|\r\n]*\|[^\]\r\n]*\]")

# Popen handles of the jobs this process started: they tell a finished child from a running one
# (and reap it) without looking the pid up.
_CHILDREN: dict[int, subprocess.Popen] = {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:  # readers never see half a file; on Windows, waits out a reader
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _write_json_if_absent(path: Path, data: dict[str, Any]) -> None:
    """Write `path` only if nobody has (the child may already have said it failed): a hard link
    of a finished temp file either creates the name or fails, in one step, on any OS."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links (FAT): the small race is the lesser evil
        if not path.exists():
            replace_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _process_alive(pid: int | None) -> bool:
    child = _CHILDREN.get(pid) if pid else None
    if child is not None:
        return child.poll() is None
    return processes.pid_alive(pid)


def _heartbeat_age(run_dir: Path) -> float:
    """Seconds since the job's process last touched its heartbeat file (inf without one)."""
    try:
        return time.time() - (run_dir / HEARTBEAT_FILE).stat().st_mtime
    except OSError:
        return float("inf")


def _beat(path: Path, every_s: float, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            path.touch()
        except OSError:
            pass  # a full disk or a passing lock: the next beat tries again
        stop.wait(every_s)


def start_heartbeat(run_dir: Path, every_s: float = HEARTBEAT_EVERY_S) -> threading.Event:
    """Touch `run_dir/heartbeat` every `every_s` seconds from a daemon thread; set the event to stop."""
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(run_dir / HEARTBEAT_FILE, every_s, stop), daemon=True)
    beat.start()
    return stop


@dataclasses.dataclass
class Job:
    """One training run, known by its folder."""

    run_dir: Path

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)

    # --- reading ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def info(self) -> dict[str, Any]:
        """job.json: created (unix time), resumed_from (run folder or None)."""
        return _read_json(self.run_dir / "job.json")

    def config(self) -> TrainConfig:
        return TrainConfig.from_toml(self.run_dir / "config.toml")

    def status(self) -> dict[str, Any]:
        """{state, message, lora_path, pid}; a process that died without saying so is reported."""
        st = {"state": "error", "message": "no status.json", "lora_path": None, "pid": None}
        st.update(_read_json(self.run_dir / "status.json"))
        if st["state"] != "running":
            return st
        if not _process_alive(st.get("pid")):
            if (self.run_dir / STOP_FILE).exists():
                st.update(state="stopped", message="stopped before training began; nothing was saved")
            else:
                st.update(
                    state="error",
                    message=f"the training process ended without a word; see {self.run_dir / 'log.txt'}",
                )
        elif (age := _heartbeat_age(self.run_dir)) > HEARTBEAT_STALE_S:
            # hung, or its pid now belongs to another program after it died unseen
            st.update(
                state="error",
                message=f"the training process (pid {st['pid']}) has given no sign of life for "
                f"{min(age, 1e6):.0f} s; see {self.run_dir / 'log.txt'}",
            )
        return st

    @property
    def state(self) -> str:
        return self.status()["state"]

    def is_running(self) -> bool:
        return self.state == "running"

    def progress(self, with_previous: bool = False) -> list[dict[str, Any]]:
        """Progress reports as dicts (step, total_steps, epoch, total_epochs, loss, lr, its, eta_s, time).

        with_previous: also those of the runs this one resumed, so a loss curve goes on across Stop/Resume.
        """
        rows: list[dict[str, Any]] = []
        path = self.run_dir / "progress.jsonl"
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass  # a line being written right now
        if with_previous and self.info.get("resumed_from"):
            prev = Job(Path(self.info["resumed_from"]))
            if prev.run_dir.is_dir():
                first = rows[0]["step"] if rows else float("inf")
                rows = [r for r in prev.progress(with_previous=True) if r["step"] < first] + rows
        return rows

    def log_text(self, max_chars: int = 20000) -> str:
        """The end of log.txt, with progress-bar redraws (carriage returns) folded."""
        path = self.run_dir / "log.txt"
        if not path.is_file():
            return ""
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - max_chars))
            text = f.read().decode("utf-8", "replace")
        text = _TQDM_BAR.sub("", text)  # the trainer's progress bar: the log has a line per report
        lines = [line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line for line in text.split("\n")]
        return "\n".join(line.rstrip("\r") for line in lines if line.strip("\r "))

    def state_dir(self) -> Path:
        """Where Stop leaves the state that Resume continues from."""
        o = self.config().output
        return Path(o.output_dir) / f"{o.output_name}-state"

    def resumable_state(self) -> Path | None:
        """The newest complete state of this run's output name, or None.

        Stop leaves `<name>-state`; each epoch save (save_every_n_epochs) leaves `<name>-NNNNNN-state`,
        which is all a crashed run has. Hidden temp folders and states missing a file are skipped.
        """
        o = self.config().output
        folder = Path(o.output_dir)
        pattern = re.compile(re.escape(o.output_name) + r"(-\d+)?-state")
        found = []
        for d in folder.iterdir() if folder.is_dir() else []:
            if pattern.fullmatch(d.name) and (written := _state_written(d)) is not None:
                found.append((written, d.name, d))
        return max(found)[2] if found else None

    def samples(self) -> list[Path]:
        """Sample images this run's output name has, oldest first."""
        o = self.config().output
        folder = Path(o.output_dir) / "sample"
        if not folder.is_dir():
            return []
        found = [p for p in folder.glob(f"{o.output_name}_*.png") if p.is_file()]
        return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))

    # --- acting --------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the trainer to stop: after the optimizer step under way it saves its state (for
        Resume) and exits. Returns at once."""
        st = self.status()
        marker = self.run_dir / STOP_FILE
        if st["state"] != "running" or marker.exists():  # a second interrupt would cut the save short
            return
        # POSIX: SIGINT also stops a job still loading. Sent before the file exists, so the trainer
        # cannot see the file, start saving and then be cut short by the signal.
        processes.interrupt(st["pid"])
        marker.touch()

    def kill(self) -> None:
        """End the process without saving, the last resort for a job that no longer answers stop()."""
        st = self.status()
        if st["state"] == "running":
            (self.run_dir / STOP_FILE).touch()
            child = _CHILDREN.get(st["pid"])
            if child is not None:
                child.kill()  # SIGKILL / TerminateProcess on the handle: never a reused pid
            else:
                processes.terminate(st["pid"])

    def wait(self, timeout: float | None = None, poll_s: float = 0.2) -> dict[str, Any]:
        """Wait until the job is no longer running; returns its status (still running on timeout)."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status()
            if st["state"] != "running" or (end is not None and time.monotonic() > end):
                return st
            time.sleep(poll_s)

    def resume(self, runs_dir: str | Path | None = None) -> Job:
        """Start a new job with the same config that continues from the saved state."""
        if self.is_running():
            raise TrainingError(f"{self.name} is still running: stop it before resuming")
        state = self.resumable_state()
        if state is None:
            raise TrainingError(
                f"nothing to resume: no complete {self.state_dir().name} or epoch state in "
                f"{self.state_dir().parent} (the run stopped before its first save)"
            )
        cfg = self.config()
        cfg.output.resume = str(state)
        return start_job(cfg, runs_dir or self.run_dir.parent, resumed_from=self.run_dir)


def _state_written(folder: Path) -> float | None:
    """When a state folder was completed (its train_state.json), or None when it is not a whole state."""
    needed = [folder / n for n in STATE_FILES]
    try:
        if not all(p.is_file() for p in needed) or not isinstance(
            json.loads(needed[-1].read_text())["step"], int
        ):
            return None
        return needed[-1].stat().st_mtime
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _absolute_paths(cfg: TrainConfig) -> None:
    flat = cfg.flat()
    changed = {}
    for name in PATH_OPTIONS:
        value = flat.get(name)
        if value:
            p = Path(value).expanduser()
            if name != "pretrained_model_name_or_path" or p.exists():  # leave hub ids alone
                changed[name] = str(p.absolute())
    cfg.update(changed)


def _new_run_dir(runs_dir: Path, output_name: str) -> Path:
    runs_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in output_name) or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        run_dir = runs_dir / (f"{stamp}-{safe}" if i == 0 else f"{stamp}-{safe}-{i}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise TrainingError(f"cannot make a run folder in {runs_dir}")


def start_job(
    cfg: TrainConfig,
    runs_dir: str | Path,
    sample_prompts_text: str | None = None,
    resumed_from: str | Path | None = None,
    allow_concurrent: bool = False,
) -> Job:
    """Launch `train(cfg)` in a new process and return at once.

    The config is checked first (a wrong option raises ConfigError here); anything found later
    (a bad folder, a missing model) ends the job in state "error" with the message. save_state is
    always on, so that Stop leaves a state to Resume from. sample_prompts_text, when given, is
    written to the run folder and used as the sample prompts file.
    """
    runs_dir = Path(runs_dir)
    cfg = TrainConfig.from_dict(cfg.flat())  # a copy: the caller's config is not changed
    cfg.output.save_state = True
    _absolute_paths(cfg)
    cfg.validate()
    if not allow_concurrent:
        running = [j for j in find_jobs(runs_dir) if j.is_running()]
        if running:
            raise TrainingError(f"a training run is going on ({running[-1].name}): stop it first")
    run_dir = _new_run_dir(runs_dir, cfg.output.output_name)
    if sample_prompts_text is not None and sample_prompts_text.strip():
        prompts = run_dir / "sample_prompts.txt"
        prompts.write_text(sample_prompts_text.strip() + "\n", encoding="utf-8")
        cfg.sample.sample_prompts = str(prompts.absolute())
    (run_dir / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    info = {"created": time.time(), "resumed_from": str(resumed_from) if resumed_from else None}
    _write_json(run_dir / "job.json", info)

    # UTF-8 output on Windows too: log lines name Japanese folders, and a cp1252 console would choke
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", PYTHONIOENCODING="utf-8")
    (run_dir / HEARTBEAT_FILE).touch()  # alive from now on, until the child's own beats take over
    with open(run_dir / "log.txt", "ab") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "lorakit.train.job", str(run_dir.absolute())],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=os.getcwd(),
            **processes.detached_popen_kwargs(),  # the GUI's Ctrl-C or exit leaves it alone
        )
    _CHILDREN[child.pid] = child
    status = {"state": "running", "message": "starting", "lora_path": None, "pid": child.pid}
    _write_json_if_absent(run_dir / "status.json", status)  # the child may already have written its own
    log.info("training job %s started (pid %d)", run_dir, child.pid)
    return Job(run_dir)


def find_jobs(runs_dir: str | Path) -> list[Job]:
    """Every run folder under runs_dir, oldest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    jobs = [Job(d) for d in root.iterdir() if d.is_dir() and (d / "config.toml").is_file()]
    return sorted(jobs, key=lambda j: (j.info.get("created", 0), j.name))


def latest_job(runs_dir: str | Path) -> Job | None:
    jobs = find_jobs(runs_dir)
    return jobs[-1] if jobs else None


# --- the child process -----------------------------------------------------------------


def _child_main(run_dir: Path) -> int:
    heartbeat = start_heartbeat(run_dir)  # first: importing torch may take a while
    from .trainer import train

    # Python leaves SIGINT ignored when it was ignored at start (a job started from a background
    # shell); Stop needs it to raise KeyboardInterrupt, so that the trainer saves its state.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    status_path = run_dir / "status.json"
    pid = os.getpid()

    def set_status(state: str, message: str, lora_path: str | None = None) -> None:
        _write_json(status_path, {"state": state, "message": message, "lora_path": lora_path, "pid": pid})

    set_status("running", "loading the dataset and the model")
    progress_file = (run_dir / "progress.jsonl").open("a", encoding="utf-8")

    from ..generate.progress import format_duration

    def on_progress(p) -> None:
        row = dataclasses.asdict(p) | {"time": time.time()}
        progress_file.write(json.dumps(row) + "\n")
        progress_file.flush()
        loss = f"{p.loss:.4f}" if p.loss is not None else "-"
        val = f"  val_loss {p.validation_loss:.4f}" if p.validation_loss is not None else ""
        log.info(
            "step %d/%d  epoch %d/%d  loss %s%s  lr %.2e  %.2f it/s  ETA %s",
            p.step, p.total_steps, p.epoch, p.total_epochs, loss, val, p.lr, p.its, format_duration(p.eta_s),
        )  # fmt: skip
        set_status("running", f"step {p.step}/{p.total_steps}")

    started = time.time()
    try:
        cfg = TrainConfig.from_toml(run_dir / "config.toml")
    except LoraKitError as e:
        set_status("error", str(e))
        return 2
    try:
        path = train(cfg, on_progress=on_progress, stop_file=run_dir / STOP_FILE)
    except KeyboardInterrupt:
        state = Path(cfg.output.output_dir) / f"{cfg.output.output_name}-state"
        if state.is_dir() and state.stat().st_mtime >= started - 1:
            set_status("stopped", f"stopped; the state was saved to {state} (Resume continues from it)")
        else:
            set_status("stopped", "stopped before training began; nothing was saved")
        log.warning("stopped")
        return 130
    except LoraKitError as e:
        log.error("%s", e)
        set_status("error", str(e))
        return 2
    except BaseException as e:
        log.exception("training failed")
        set_status("error", f"{type(e).__name__}: {e} (the traceback is in {run_dir / 'log.txt'})")
        return 1
    finally:
        progress_file.close()
        heartbeat.set()
    set_status("done", f"saved {path}", str(path))
    log.info("LoRA saved: %s", path)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m lorakit.train.job RUN_DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(_child_main(Path(sys.argv[1])))
