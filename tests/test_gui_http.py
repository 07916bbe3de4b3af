"""The GUI server against forged requests: `lorakit gui` in a subprocess, called over HTTP the way
a hostile page or client would (Gradio's queue API with hand-made data, foreign Host/Origin headers,
password guessing), plus the rules behind it (guard.py) and the Dataset/Train tabs' helpers.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")
httpx = pytest.importorskip("httpx")

from lorakit.config import TrainConfig  # noqa: E402
from lorakit.errors import ConfigError  # noqa: E402
from lorakit.gui.guard import LoginLimiter, config_file, host_allowed  # noqa: E402
from lorakit.testing import make_dataset  # noqa: E402

PASSWORD = "s3cret-pass"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(root: Path, cwd: Path, *args: str) -> tuple[subprocess.Popen, str, int]:
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_TEMP_DIR=str(root / f"gr-{port}"))
    cmd = [
        sys.executable,
        "-m",
        "lorakit",
        "gui",
        "--port",
        str(port),
        "--model",
        str(root / "base" / "no-model"),  # its folder is a model root: one that holds nothing else
        *args,
    ]
    log_path = root / f"server-{port}.log"
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, cwd=cwd, env=env)
    end = time.monotonic() + 120
    while time.monotonic() < end and proc.poll() is None:
        if re.search(r"lorakit GUI: http://", log_path.read_text()):
            return proc, f"http://127.0.0.1:{port}", port
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"the GUI did not start:\n{log_path.read_text()}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_base):
    """A working folder with a dataset and a config folder; an outside folder with a dataset,
    a secret and a model; an extra --data_dir root; a --model_dir root with the tiny model."""
    import shutil

    root = tmp_path_factory.mktemp("guihttp")
    work, outside, extra = root / "work", root / "outside", root / "extra"
    (root / "models").mkdir()
    outside.mkdir()
    shutil.copy(tiny_base, root / "models" / "tiny.safetensors")
    shutil.copy(tiny_base, outside / "model.safetensors")
    train, _ = make_dataset(work / "data", n_train=2, n_reg=0, repeats=2)
    make_dataset(outside / "data", n_train=1, n_reg=0, repeats=1)
    make_dataset(extra / "data", n_train=1, n_reg=0, repeats=3)
    (outside / "secret.toml").write_text('[model]\npretrained_model_name_or_path = "TOP-SECRET"\n')
    (work / "link").symlink_to(outside / "data", target_is_directory=True)
    (work / "configs").mkdir()
    proc, url, port = _start(
        root,
        work,
        "--config_dir",
        str(work / "configs"),
        "--data_dir",
        str(extra),
        "--runs_dir",
        "runs",
        "--model_dir",
        str(root / "models"),
    )
    yield {
        "root": root,
        "work": work,
        "outside": outside,
        "extra": extra,
        "train": train,
        "url": url,
        "port": port,
    }
    _stop(proc)
    from lorakit.train.job import find_jobs

    for job in find_jobs(work / "runs"):  # leave no training process behind
        job.kill()


class Api:
    """Gradio's queue protocol by hand: whatever data a client likes, for one session."""

    def __init__(self, url: str, session: str, cookies=None) -> None:
        self.url, self.session, self.cookies = url, session, cookies
        config = httpx.get(f"{url}/config", cookies=cookies).json()
        deps = [d for d in config["dependencies"] if d.get("api_name")]
        self.ids = {d["api_name"]: d["id"] for d in deps}
        self.n_inputs = {d["api_name"]: len(d["inputs"]) for d in deps}
        elem_ids = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
        self.input_ids = {d["api_name"]: [elem_ids.get(i) for i in d["inputs"]] for d in deps}

    def __call__(self, api_name: str, data: list, event_data=None) -> dict:
        data = data + [None] * (self.n_inputs[api_name] - len(data))  # the fields a forger leaves out
        body = {"data": data, "fn_index": self.ids[api_name], "session_hash": self.session}
        body.update(event_data=event_data, trigger_id=None)
        r = httpx.post(f"{self.url}/gradio_api/queue/join", json=body, cookies=self.cookies)
        assert r.status_code == 200, r.text
        params = {"session_hash": self.session}
        with httpx.stream(
            "GET", f"{self.url}/gradio_api/queue/data", params=params, timeout=60, cookies=self.cookies
        ) as s:
            for line in s.iter_lines():
                if line.startswith("data:"):
                    msg = json.loads(line[5:])
                    if msg.get("msg") == "process_completed":
                        return msg["output"]
        raise AssertionError("no answer")


def _train_fields(api: Api, api_name: str, **values) -> list:
    """The Train tab's widget values for `api_name` (defaults, then `values`), the last input empty."""
    from lorakit.gui.train_tab import widget_value

    flat = TrainConfig().flat() | values
    ids = api.input_ids[api_name]
    out = [widget_value(i[4:], flat[i[4:]]) if i and i.startswith("cfg-") else None for i in ids]
    out[-1] = ""
    return out


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


# --- Host / Origin -----------------------------------------------------------------------


def test_foreign_host_or_origin_gets_403(site):
    url, port = site["url"], site["port"]
    assert httpx.get(url + "/").status_code == 200
    for host in (f"localhost:{port}", f"[::1]:{port}"):
        assert httpx.get(url + "/", headers={"Host": host}).status_code == 200
    for host in (
        f"evil.example:{port}",
        "evil.example",
        f"127.0.0.1:{port + 1}",
        f"127.0.0.1.evil.example:{port}",
    ):
        assert httpx.get(url + "/config", headers={"Host": host}).status_code == 403, host
    for origin in ("http://evil.example", f"http://evil.example:{port}", "null"):
        assert httpx.get(url + "/config", headers={"Origin": origin}).status_code == 403, origin
    assert httpx.get(url + "/config", headers={"Origin": f"http://127.0.0.1:{port}"}).status_code == 200
    # a rebinding page's API call does not reach a handler
    before = _files(site["work"])
    body = {"data": ["x"], "fn_index": 0, "session_hash": "rebind"}
    r = httpx.post(url + "/gradio_api/queue/join", json=body, headers={"Host": f"evil.example:{port}"})
    assert r.status_code == 403 and _files(site["work"]) == before


# --- Dataset: scan and captions ------------------------------------------------------------


def _scan(api: Api, folder, ext=".caption") -> dict:
    return api("scan_dataset", [str(folder), "", ext, "stop"])


def test_dataset_scan_refuses_folders_outside_the_roots(site):
    api = Api(site["url"], "scan-outside")
    for folder in (site["outside"] / "data" / "train", "../outside/data/train", site["work"] / "link"):
        out = _scan(api, folder)
        assert "outside the folders this GUI may use" in out.get("error", ""), (folder, out)
        assert "--data_dir" in out["error"]
    ok = _scan(api, "data/train")  # relative to the working folder
    assert "Ready" in ok["data"][0] and "2_usu bear" in json.dumps(ok["data"][1])
    extra = _scan(api, site["extra"] / "data" / "train")  # a --data_dir root
    assert "Ready" in extra["data"][0] and "3_usu bear" in json.dumps(extra["data"][1])


def test_caption_save_writes_only_beside_a_scanned_image(site):
    outside, folder = site["outside"], site["train"] / "2_usu bear"
    forged_scan = {"images": [str(outside / "x.png")], "ext": ".pth"}
    outside_before, work_before = _files(outside), _files(site["work"])

    # a session that never scanned: forged state values are not used
    api = Api(site["url"], "forger")
    out = api("save_caption", [forged_scan, 0, "import os"])
    assert "Click an image first" in out.get("error", "")

    # a scan with a code-like extension: listing works, saving does not follow the extension
    assert "Ready" in _scan(api, site["train"], ext=".pth")["data"][0]
    api("pick_image", [forged_scan], event_data={"index": 0, "value": None})
    out = api("save_caption", [forged_scan, 0, "import os"])
    assert "saves captions only as .caption or .txt" in out.get("error", "")

    # an index outside the scan is refused
    assert "Ready" in _scan(api, site["train"])["data"][0]
    assert "not in the list" in api("pick_image", [None], event_data={"index": 7, "value": None}).get(
        "error", ""
    )
    assert _files(outside) == outside_before and _files(site["work"]) == work_before

    # the real thing: the image the server listed at that index, with the scanned extension
    picked = api("pick_image", [forged_scan], event_data={"index": 1, "value": None})["data"]
    assert picked[0] == str((folder / "usu_01.png").resolve()) and picked[1] == "usu bear"
    out = api("save_caption", [forged_scan, 0, "usu bear, smiling"])
    target = folder / "usu_01.caption"
    assert out["data"][0] == f"Saved {target.resolve()}"
    assert target.read_text() == "usu bear, smiling\n"
    again = api("save_caption", [forged_scan, 0, "usu bear, sitting"])
    assert again.get("data", [""])[0].startswith("Saved"), again
    assert target.read_text() == "usu bear, sitting\n"  # the same image stays picked after the rescan
    assert _files(outside) == outside_before and _files(site["work"]) == work_before | {target}
    target.unlink()

    # scanning other folders empties the caption editor and forgets the picked image: Save then
    # cannot write into the previous folders
    scan = _scan(api, site["extra"] / "data" / "train")
    assert "Ready" in scan["data"][0] and scan["data"][-3:] == ["", "", ""]
    assert "Click an image first" in api("save_caption", [forged_scan, 0, "stale"]).get("error", "")
    assert _files(site["work"]) == work_before


# --- Train tab: config files, training folders, Resume -----------------------------------


def test_config_save_and_load_only_toml_files_in_the_config_folder(site):
    configs, outside = site["work"] / "configs", site["outside"]
    api = Api(site["url"], "configs")
    (configs / "base.toml").write_text(
        TrainConfig.from_dict({"network_dim": 7, "output_name": "base"}).to_toml()
    )
    before = _files(site["root"])
    for name in ("../evil", str(outside / "evil"), "sub/evil", "..", "", "a\\b", ".hidden"):
        out = api("save_config", [name])
        assert "use a plain name" in out.get("error", ""), (name, out)
        out = api("load_config", [name])
        assert "use a plain name" in out.get("error", ""), (name, out)
    out = api("load_config", ["../../outside/secret"])
    assert "TOP-SECRET" not in json.dumps(out)
    assert _files(site["root"]) == before

    loaded = api("load_config", ["base.toml"])["data"]
    assert 7 in loaded and loaded[-1].startswith("Loaded ")
    saved = api("save_config", ["copy.py", *loaded[:-1]])["data"][0]
    assert saved.startswith(f"Saved {configs / 'copy.py.toml'}")  # the extension is the server's
    assert _files(site["root"]) == before | {configs / "copy.py.toml"}
    assert TrainConfig.from_toml(configs / "copy.py.toml").network.network_dim == 7


def test_training_folders_must_lie_in_the_roots(site, monkeypatch):
    from lorakit.gui.common import Settings
    from lorakit.gui.train_tab import check_folders

    monkeypatch.chdir(site["work"])
    settings = Settings(
        model=str(site["root"] / "models" / "tiny.safetensors"),
        lora_dir=site["work"] / "models",
        data_dirs=(site["extra"],),
    )
    good = {
        "train_data_dir": "data/train",
        "output_dir": "models",
        "output_name": "x",
        "pretrained_model_name_or_path": settings.model,
    }
    check_folders(TrainConfig.from_dict(good), settings)
    check_folders(
        TrainConfig.from_dict(good | {"train_data_dir": str(site["extra"] / "data" / "train")}), settings
    )
    for bad, match in (
        ({"train_data_dir": str(site["outside"] / "data" / "train")}, "train_data_dir .* is outside"),
        ({"reg_data_dir": "../outside"}, "reg_data_dir .* is outside"),
        ({"output_dir": str(site["outside"])}, "output_dir .* is outside"),
        ({"logging_dir": "/"}, "logging_dir .* is outside"),
        ({"output_name": "../../x"}, "output_name"),
        (
            {"pretrained_model_name_or_path": str(site["outside"] / "model.safetensors")},
            "pretrained.* outside",
        ),
        ({"network_weights": str(site["outside"] / "model.safetensors")}, "network_weights .* is outside"),
        ({"vae": str(site["outside"] / "model.safetensors")}, "vae .* is outside"),
        ({"validation_data_dir": "../outside"}, "validation_data_dir .* is outside"),
        ({"conditioning_data_dir": "../outside"}, "conditioning_data_dir .* is outside"),
    ):
        with pytest.raises(ConfigError, match=match):
            check_folders(TrainConfig.from_dict(good | bad), settings)


def _fake_state(folder: Path, step: int, complete: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "network.safetensors").write_bytes(b"x")
    if complete:
        (folder / "optimizer.pt").write_bytes(b"x")
    (folder / "train_state.json").write_text(
        json.dumps({"epoch": 1, "step": step, "batch_in_epoch": 0, "seed": 1})
    )
    time.sleep(0.02)  # distinct modification times
    return folder


def _crashed_run(runs: Path, out: Path, train: Path, name: str):
    """A run folder as a crashed trainer leaves it (status "error"), without running one."""
    from lorakit.train.job import Job, _write_json

    run = runs / f"20240101-000000-{name}"
    run.mkdir(parents=True)
    cfg = TrainConfig.from_dict(
        {
            "train_data_dir": str(train),
            "output_dir": str(out),
            "output_name": name,
            "pretrained_model_name_or_path": "m",
        }
    )
    (run / "config.toml").write_text(cfg.to_toml())
    _write_json(run / "job.json", {"created": time.time(), "resumed_from": None})
    _write_json(run / "status.json", {"state": "error", "message": "killed", "lora_path": None, "pid": None})
    return Job(run)


def test_resume_after_a_crash_offers_the_newest_complete_epoch_state(site):
    out = site["work"] / "models" / "Lora"
    job = _crashed_run(site["work"] / "runs", out, site["train"], "crashy")
    _fake_state(out / "crashy-000001-state", step=4)
    newest = _fake_state(out / "crashy-000002-state", step=8)
    _fake_state(out / "crashy-000003-state", step=12, complete=False)  # cut short: no optimizer.pt
    _fake_state(out / ".crashy-000004-state.tmp1", step=16)  # a save's temp folder
    _fake_state(out / "crashy-extra-state", step=20)  # another output name ("crashy-extra")
    assert job.resumable_state() == newest

    api = Api(site["url"], "resume")
    msg = api("resume", [])["data"][0]
    try:
        assert f"from `{newest}`" in msg, msg
    finally:
        from lorakit.train.job import find_jobs

        for j in find_jobs(site["work"] / "runs"):
            j.kill()


# --- --listen --auth ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("guiauth")
    # a --config_dir that does not exist yet: Save config makes it
    proc, url, port = _start(
        root, root, "--listen", "--auth", f"user:{PASSWORD}", "--config_dir", "new/configs"
    )
    yield url, port
    _stop(proc)


def _login(url: str, password: str) -> httpx.Response:
    return httpx.post(url + "/login", data={"username": "user", "password": password})


def test_save_config_makes_a_config_folder_that_does_not_exist_yet(shared):
    url, _ = shared  # (before the guessing test below locks this client out)
    api = Api(url, "save-new", cookies=_login(url, PASSWORD).cookies)
    data = api("load_config", ["missing"])
    assert "does not exist" in data.get("error", "")
    values = _train_fields(api, "save_config", output_name="fresh")
    values[0] = "fresh"
    values[-1] = "usu bear, in the snow"  # the sample prompts, written beside the config
    out = api("save_config", values)
    assert out.get("data", [""])[0].startswith(f"Saved {Path('new/configs/fresh.toml')}"), out
    saved = api("load_config", ["fresh"])["data"]
    assert "fresh" in saved and "usu bear, in the snow\n" in saved  # the config and its prompts file


def test_listen_auth_asks_for_the_password_and_refuses_guessing(shared):
    url, port = shared
    # any name reaches a --listen server (it is meant to be reached by the machine's name)
    assert httpx.get(url + "/", headers={"Host": f"my-box.lan:{port}"}).status_code == 200
    assert httpx.get(url + "/config").status_code == 401  # the app itself needs the login
    ok = _login(url, PASSWORD)
    assert ok.status_code == 200 and ok.json() == {"success": True}
    config = httpx.get(url + "/config", cookies=ok.cookies)
    assert config.status_code == 200 and config.json()["dependencies"]
    for _ in range(5):
        assert _login(url, "guess").status_code == 400
    refused = _login(url, PASSWORD)  # even the right password, for a while
    assert refused.status_code == 429 and "too many failed logins" in refused.text


# --- base models: only from the model roots ------------------------------------------------------


def _model_error(out: dict) -> str:
    assert "data" not in out or out.get("success") is False, out
    return out.get("error") or ""


def test_model_paths_outside_the_model_roots_are_refused_everywhere(site):
    work, outside = site["work"], site["outside"]
    (work / "models-link").symlink_to(outside, target_is_directory=True)
    api = Api(site["url"], "models-outside")
    before = _files(site["root"])
    loaded = api("load_config", ["missing"])
    assert "does not exist" in loaded.get("error", "")

    def train(**changes):
        base = {
            "train_data_dir": "data/train",
            "output_dir": "models/Lora",
            "output_name": "nope",
            "pretrained_model_name_or_path": str(site["root"] / "models" / "tiny.safetensors"),
        }
        return api("train", _train_fields(api, "train", **(base | changes)))

    def generate(model):
        return api("generate", [model, "usu bear", "", "Euler", 1, 64, 64, 7, 1, 1, 1])

    def reg(model):
        return api("make_reg_images", [model, "bear", 1, "reg", 1, 64])

    for model in (
        outside / "model.safetensors",  # a real model, outside
        outside / "no-such.safetensors",  # its answer must not differ: no probing the host
        work / "models-link" / "model.safetensors",  # a symlink out of the roots
        "../outside/model.safetensors",
    ):
        errors = [
            _model_error(train(pretrained_model_name_or_path=str(model))),
            _model_error(train(network_weights=str(model))),
            _model_error(generate(str(model))),
            _model_error(reg(str(model))),
        ]
        for err in errors:
            assert "is outside the folders this GUI may use" in err and "--model_dir" in err, (model, err)
        assert "network_weights" in errors[1]
    real, missing = (
        _model_error(generate(str(outside / n))) for n in ("model.safetensors", "no-such.safetensors")
    )
    assert real.replace("model.safetensors", "X") == missing.replace("no-such.safetensors", "X")
    # inside the roots but no model: a plain file of another kind is not read either
    (work / "data" / "notes.txt").write_text("x")
    err = _model_error(generate(str(work / "data" / "notes.txt")))
    assert "no model there" in err
    (work / "data" / "notes.txt").unlink()
    assert _files(site["root"]) == before  # no run started, no image or reg image written
    assert not (work / "runs").exists() or not any("nope" in p.name for p in (work / "runs").iterdir())


def test_train_refuses_a_flux_base_before_any_run_starts(site):
    """The Train button's own handler, over HTTP: a FLUX file in a model root is named and refused
    (before a job would load it); an SDXL base with sample prompts is refused with the fix."""
    models = site["root"] / "models"
    _fake_base(models / "flux1-dev.safetensors", *FLUX_KEYS, **{"img_in.weight": (8, 64)})
    _fake_base(models / "sdxl.safetensors", *SDXL_KEYS)
    api = Api(site["url"], "train-family")
    runs = site["work"] / "runs"
    before = set(runs.iterdir()) if runs.exists() else set()

    def train(model, prompts=""):
        fields = _train_fields(
            api, "train", train_data_dir="data/train", output_dir="models/Lora", output_name="family",
            pretrained_model_name_or_path=str(models / model),
        )  # fmt: skip
        fields[-1] = prompts
        return api("train", fields)

    err = train("flux1-dev.safetensors").get("error") or ""
    assert "FLUX.1 dev: not supported yet" in err and "SD1.x and SDXL" in err, err
    assert (set(runs.iterdir()) if runs.exists() else set()) == before  # no run started


def test_a_model_in_a_model_dir_draws(site):
    api = Api(site["url"], "models-inside")
    outputs = site["work"] / "outputs"
    before = _files(outputs) if outputs.exists() else set()
    model = site["root"] / "models" / "tiny.safetensors"
    out = api("generate", [str(model), "usu bear", "", "Euler", 1, 64, 64, 7, 1, 1, 1])
    assert "error" not in out or not out["error"], out
    assert "Steps: 1" in out["data"][1] and "RNG:" not in out["data"][1]  # GPU noise: A1111's default
    assert len(_files(outputs) - before) == 1
    # A1111's "Random number generator source" setting: CPU noise, said in the PNG info as A1111 says it
    out = api("generate", [str(model), "usu bear", "", "Euler", 1, 64, 64, 7, 0, 1, 1, 1, "CPU"])
    assert "RNG: CPU" in out["data"][1], out


def test_settings_model_path_follows_symlinks_and_wants_a_model(tmp_path, monkeypatch):
    from lorakit.gui.common import Settings

    monkeypatch.chdir(tmp_path)
    models, outside = tmp_path / "models", tmp_path.parent / (tmp_path.name + "-out")
    (models / "sd15" / "unet").mkdir(parents=True)
    (models / "sd15" / "model_index.json").write_text("{}")
    (models / "a.safetensors").write_bytes(b"x")
    (models / "notes.txt").write_text("x")
    outside.mkdir()
    (outside / "b.ckpt").write_bytes(b"x")
    (models / "b.ckpt").symlink_to(outside / "b.ckpt")
    settings = Settings(model=str(models / "a.safetensors"), lora_dir=tmp_path / "loras")
    assert settings.model_path(str(models / "sd15")) == (models / "sd15").resolve()
    assert settings.model_path("models/a.safetensors") == (models / "a.safetensors").resolve()
    for bad, match in (
        ("models/b.ckpt", "outside the folders"),
        (str(outside / "b.ckpt"), "outside the folders"),
        ("models/notes.txt", "no model there"),
        ("models/sd15/unet", "no model there"),
        ("", "give the model"),
    ):
        with pytest.raises(ConfigError, match=match):
            settings.model_path(bad)
    assert settings.known_model(str(outside / "b.ckpt")) == ""
    # the shipped demo model can always be picked: the GUI works out of the box
    from lorakit.demo import DEMO_MODEL

    assert Settings().model_path(str(DEMO_MODEL)) == DEMO_MODEL.resolve()
    assert settings.model_path(str(DEMO_MODEL)) == DEMO_MODEL.resolve()


# --- the rules themselves -----------------------------------------------------------------------


def test_login_limiter_counts_failures_in_a_window_and_locks_for_a_while():
    now = [0.0]
    lim = LoginLimiter(max_failures=3, window_s=60, lockout_s=300, clock=lambda: now[0])
    for t in (0, 30, 70):  # the first failure has left the window when the third comes
        now[0] = t
        lim.failed("a")
    assert lim.retry_after("a") == 0
    now[0] = 80
    lim.failed("a")
    assert lim.retry_after("a") == 300 and lim.retry_after("b") == 0  # per client
    now[0] = 379
    assert lim.retry_after("a") == 1
    now[0] = 380
    assert lim.retry_after("a") == 0
    for _ in range(3):
        lim.failed("c")
    lim.succeeded("c")  # the right password (an attempt counts as failed until it succeeds)
    assert lim.retry_after("c") == 0


def test_host_allowed_only_names_this_server_on_loopback():
    assert host_allowed("127.0.0.1:7860", None, 7860)
    assert host_allowed("LOCALHOST:7860", "http://localhost:7860", 7860)
    assert host_allowed("localhost", None, 80)
    assert not host_allowed("localhost", None, 7860)
    assert not host_allowed(None, None, 7860)
    assert not host_allowed("127.0.0.1:7860", "http://127.0.0.1:7861", 7860)


def test_config_file_is_a_toml_in_the_config_folder(tmp_path):
    assert config_file(tmp_path, " my-lora ") == tmp_path / "my-lora.toml"
    assert config_file(tmp_path, "my-lora.TOML") == tmp_path / "my-lora.toml"
    assert config_file(tmp_path, "v1.5 style") == tmp_path / "v1.5 style.toml"
    for name in ("../x", "a/b", "a\\b", "..", "x..y", "/etc/passwd", "C:evil", ".toml", "-"):
        with pytest.raises(ConfigError, match="plain name"):
            config_file(tmp_path, name)


def test_dataset_tab_shows_the_caption_training_uses_or_its_error(tmp_path):
    from lorakit.gui.dataset_tab import list_folders

    train, _ = make_dataset(tmp_path, n_train=3, n_reg=0, repeats=2)
    folder = train / "2_usu bear"
    (folder / "usu_00.caption").write_text("first line\nsecond line\n")
    (folder / "usu_01.caption").write_text("")  # training stops on an empty caption file
    (folder / "usu_02.caption").write_bytes(b"\xff\xfe bad")
    _, items = list_folders(str(train), "", ".caption")
    captions = [c for _, c in items]
    assert captions[0] == "first line"
    assert captions[1].startswith("✗ ") and "caption file is empty" in captions[1]
    assert captions[2].startswith("✗ ") and "not UTF-8" in captions[2]


# --- Train tab: the base model's family and the defaults that follow it ---------------------


def _fake_base(path: Path, *keys: str, **shapes) -> Path:
    """A stand-in checkpoint: the key names (and the few shapes) family detection reads, tiny zeros."""
    import numpy as np
    from safetensors.numpy import save_file

    tensors = {k: np.zeros(shapes.get(k, (1,)), dtype=np.float32) for k in keys}
    save_file(tensors, str(path))
    return path


UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
SDXL_KEYS = (UNET_IN, "conditioner.embedders.0.transformer.x", "conditioner.embedders.1.model.x")
FLUX_KEYS = ("double_blocks.0.img_attn.norm.key_norm.scale", "guidance_in.in_layer.bias", "img_in.weight")


@pytest.fixture
def bases(tmp_path) -> dict[str, Path]:
    return {
        "sd1": _fake_base(tmp_path / "sd1.safetensors", UNET_IN, "cond_stage_model.transformer.x"),
        "sdxl": _fake_base(tmp_path / "sdxl.safetensors", *SDXL_KEYS),
        "vpred": _fake_base(tmp_path / "noob-vpred.safetensors", *SDXL_KEYS, "v_pred", "ztsnr"),
        "flux": _fake_base(tmp_path / "flux1-dev.safetensors", *FLUX_KEYS, **{"img_in.weight": (8, 64)}),
        "inpaint": _fake_base(
            tmp_path / "sd15-inpainting.safetensors", UNET_IN, "cond_stage_model.transformer.x",
            **{UNET_IN: (8, 9, 3, 3)},
        ),
    }  # fmt: skip


def _defaults(path):
    from lorakit.gui.common import model_defaults_of

    return model_defaults_of(str(path))


def test_picking_an_sdxl_base_switches_the_defaults_the_user_left_and_says_why(bases):
    from lorakit.gui.base_model import auto_defaults, changes_note, family_line, switch_defaults

    sd1, sdxl = _defaults(bases["sd1"]), _defaults(bases["sdxl"])
    before = auto_defaults(sd1, "fp16")
    assert before["resolution"] == "512,512" and before["max_bucket_reso"] == 1024
    assert before["no_half_vae"] is False  # SD1 under fp16: kohya's default stays
    switch = switch_defaults(before, auto_defaults(sdxl, "fp16"), dict(before))
    assert switch.updates == {"resolution": "1024,1024", "max_bucket_reso": 2048, "no_half_vae": True}
    assert switch.kept == {}
    assert family_line(sdxl) == "Family: **SDXL base**."  # sample prompts are drawn on SDXL too
    note = changes_note(switch, sdxl)
    assert "resolution **1024,1024** (the SDXL default)" in note
    assert "max_bucket_reso **2048**" in note and "no_half_vae **on**" in note and "fp16" in note
    # a value the user changed stays, and the note says so; bf16 needs no fp32 VAE
    mine = dict(before, resolution="768,768", max_bucket_reso=1536)
    switch = switch_defaults(before, auto_defaults(sdxl, "bf16"), mine)
    assert switch.updates == {}  # max_bucket 1536, resolution 768: the user's; no_half_vae off under bf16
    assert switch.kept == {"resolution": "768,768", "max_bucket_reso": 1536}
    assert "Kept as you set them: resolution 768,768 (its default here: 1024,1024)" in changes_note(
        switch, sdxl
    )
    # and back to SD1.x: the SDXL defaults go back too; '1024' is the same size as '1024,1024'
    after = switch_defaults(
        auto_defaults(sdxl, "fp16"), before, dict(auto_defaults(sdxl, "fp16"), resolution="1024")
    )
    assert after.updates == {"resolution": "512,512", "max_bucket_reso": 1024, "no_half_vae": False}


def test_a_v_pred_base_turns_on_v_parameterization_and_zero_terminal_snr(bases):
    from lorakit.gui.base_model import (
        auto_defaults,
        changes_note,
        family_line,
        plain_defaults,
        switch_defaults,
    )

    vpred = _defaults(bases["vpred"])
    eps = auto_defaults(_defaults(bases["sdxl"]), "bf16")
    switch = switch_defaults(eps, auto_defaults(vpred, "bf16"), dict(eps))
    assert switch.updates == {"v_parameterization": True, "zero_terminal_snr": True}
    assert "SDXL base (v-prediction, zero terminal SNR)" in family_line(vpred)
    assert "v_parameterization **on** (its `v_pred` marker key)" in changes_note(switch, vpred)
    # no model to read: kohya's defaults, v-prediction off
    assert auto_defaults(None, "fp16") == plain_defaults() and plain_defaults()["v_parameterization"] is False


def test_an_sd1_base_keeps_512_and_kohyas_bucket_and_vae_defaults(bases):
    from lorakit.gui.base_model import auto_defaults, plain_defaults, switch_defaults

    sd1 = auto_defaults(_defaults(bases["sd1"]), "fp16")
    assert sd1 == plain_defaults() | {"resolution": "512,512"}
    assert switch_defaults(plain_defaults(), sd1, plain_defaults()).updates == {}  # 512 == '512,512'


def test_a_family_lorakit_refuses_is_named_before_training_starts(bases):
    from lorakit.gui.base_model import check_trainable, family_line, refusal

    flux, inpaint, sdxl = (_defaults(bases[k]) for k in ("flux", "inpaint", "sdxl"))
    assert "FLUX.1 dev: not supported yet" in refusal(flux.family)
    assert family_line(flux).startswith("✗ **FLUX.1 dev") and "Pick an SD1.x or SDXL model" in family_line(
        flux
    )
    assert "SD1.x inpainting" in refusal(inpaint.family) and "mask" in refusal(inpaint.family)
    assert refusal(sdxl.family) is None and refusal(_defaults(bases["sd1"]).family) is None
    with pytest.raises(ConfigError, match="flux1-dev.safetensors: FLUX.1 dev: not supported"):
        check_trainable(str(bases["flux"]), flux, "")
    check_trainable(str(bases["sdxl"]), sdxl, "usu bear --s 20")  # samples are drawn on SDXL too
    check_trainable(str(bases["sdxl"]), sdxl, "  \n")
    check_trainable("missing.safetensors", None, "a prompt")  # unread: the trainer says what is wrong


@pytest.mark.parametrize("name", ["sdxl-12gb-character", "sdxl-24gb-character"])
def test_sdxl_presets_fill_the_fields_with_a_config_that_validates(name):
    from lorakit.gui.train_tab import config_from_widgets, preset_note_of, widget_value
    from lorakit.presets import load_preset

    cfg = TrainConfig.from_dict(
        {"pretrained_model_name_or_path": "sdxl.safetensors", "train_data_dir": "data"}
    )
    cfg.update(load_preset("sd15-8gb-character"))  # what another preset left in the fields
    cfg.update(load_preset(name), source=f"preset {name!r}")
    flat = cfg.flat()  # through the widgets and back, as Apply preset and Train do
    again = config_from_widgets(list(flat), [widget_value(n, v) for n, v in flat.items()])
    again.validate()
    d, t = again.dataset, again.training
    assert (d.resolution, d.max_bucket_reso, d.bucket_reso_steps, d.enable_bucket) == (
        "1024,1024",
        2048,
        64,
        True,
    )
    assert t.mixed_precision == "bf16" and again.model.no_half_vae is False and t.gradient_checkpointing
    assert d.bucket_reso_steps % 32 == 0  # SDXL's bucket step
    if name == "sdxl-12gb-character":
        assert d.train_batch_size == 1 and d.cache_text_encoder_outputs and not again.trains_text_encoder
        assert t.optimizer_type == "AdamW8bit" and 16 <= again.network.network_dim <= 32
    else:
        assert d.train_batch_size >= 2 and not d.cache_text_encoder_outputs and again.trains_text_encoder
        assert t.optimizer_type in ("AdamW", "AdamW8bit") and again.network.network_dim == 32
    vram = name.split("-")[1].replace("gb", " GB")  # "12 GB"
    assert vram in preset_note_of(name)  # the note says the VRAM it is for


def test_train_tab_shows_the_sdxl_options_where_kohya_ss_has_them():
    from lorakit.gui.train_tab import CHOICES, GROUPS

    assert "Adafactor" in CHOICES["optimizer_type"]
    assert {"v_parameterization", "zero_terminal_snr"} <= set(GROUPS["Source model"])
    assert {"vae", "no_half_vae", "cache_text_encoder_outputs", "text_encoder_lr2"} <= set(GROUPS["SDXL"])
    assert "max_bucket_reso" in GROUPS["Training parameters"]  # beside the resolution it switches with
    # scale_v_pred_loss_like_noise_pred is in Advanced: every option not in a group is
    assert not any("scale_v_pred_loss_like_noise_pred" in names for names in GROUPS.values())


# --- Dataset: captioning with a tagger folder ---------------------------------------------------


def test_captioning_reads_a_tagger_in_the_model_roots_and_writes_only_in_the_data_roots(site):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from lorakit.testing import make_tiny_tagger

    root, work, outside = site["root"], site["work"], site["outside"]
    tagger = make_tiny_tagger(root / "models" / "wd-tiny-tagger")
    foreign = make_tiny_tagger(outside / "wd-tagger")
    api = Api(site["url"], "captioning")
    work_before, outside_before = _files(work), _files(outside)

    def caption(folder, model, ext=".txt", overwrite=False):
        return api("caption_images", [str(folder), ext, str(model), "usu bear", 0.35, "", True, overwrite])

    for folder, model, ext, expected in (
        (
            outside / "data" / "train",
            tagger,
            ".txt",
            "outside the folders this GUI may use",
        ),  # images outside
        (site["train"], foreign, ".txt", "outside the folders this GUI may use"),  # a tagger outside
        (site["train"], work / "link" / ".." / ".." / "outside" / "wd-tagger", ".txt", "outside"),
        (site["train"], root / "models" / "no-such-tagger", ".txt", "no such folder"),
        (site["train"], tagger, ".pth", "only as .caption or .txt"),  # never an extension from a request
        (site["train"], tagger, "../x.txt", "only as .caption or .txt"),
    ):
        out = caption(folder, model, ext)
        assert expected in out.get("error", ""), (folder, model, ext, out)
    assert _files(work) == work_before and _files(outside) == outside_before

    out = caption("data/train", tagger)  # relative to the working folder
    assert "Wrote 2 caption file(s)" in out["data"][0] and "Tag frequencies" in out["data"][0], out
    assert "2  solo" in out["data"][0]
    written = sorted(site["train"].rglob("*.txt"))
    assert [p.name for p in written] == ["usu_00.txt", "usu_01.txt"]
    assert all(p.read_text().startswith("usu bear, solo, ") for p in written)
    written[0].write_text("mine\n")
    again = caption(site["train"], tagger)
    assert "Wrote 0 caption file(s)" in again["data"][0] and "Skipped 2 image(s)" in again["data"][0]
    assert written[0].read_text() == "mine\n"
    assert "Wrote 2" in caption(site["train"], tagger, overwrite=True)["data"][0]
    assert written[0].read_text().startswith("usu bear, solo")
    assert _files(work) == work_before | set(written) and _files(outside) == outside_before
    for p in written:
        p.unlink()


def test_the_train_tabs_memory_note_names_the_family_and_warns_for_a_small_card(tmp_path):
    from lorakit.gui.train_tab import card_gib, memory_note

    cfg = TrainConfig.from_dict({"resolution": "512", "network_dim": 32, "mixed_precision": "bf16"})
    small = tmp_path / "tiny.safetensors"
    small.write_bytes(b"x" * 100)
    note = memory_note(cfg, str(small), "24 GB")
    assert "about 4.7 GB" in note and "full-size SD1.5" in note and "Fits the 24 GB card" in note
    four = TrainConfig.from_dict({"resolution": "512", "network_dim": 32, "train_batch_size": 4})
    assert "More than the 4 GB card" in memory_note(four, "", "4 GB")
    assert card_gib("12 GB") == 12.0
    # the LoRA's scale, alpha / dim, beside it (kohya's conv_alpha default 1 for networks.lora)
    assert "alpha / dim = 1 / 32 = 0.0312" in note
    locon = TrainConfig.from_dict({"network_dim": 8, "network_alpha": 4, "conv_dim": 4})
    assert "3x3 convs 1 / 4 = 0.25" in memory_note(locon, "", None)


# --- Tools tab: merge, resize, extract, convert -----------------------------------------------------

MERGE_SVD = "Into one LoRA: SVD to a new rank"


def _tool_lora(base, seed: int, rank: int) -> dict:
    """A LoRA on every third module of the tiny base (Linear and conv), small random factors."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in sorted(base.spec.module_map(base.unet, base.text_encoders).items())[::3]:
        w = mod.weight
        kernel = tuple(w.shape[2:])
        out[f"{name}.lora_down.weight"] = torch.randn(rank, w.shape[1], *kernel, generator=g) * 0.1
        out[f"{name}.lora_up.weight"] = torch.randn(
            w.shape[0], rank, *((1, 1) if kernel else ()), generator=g
        )
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


@pytest.fixture(scope="module")
def tool_loras(site):
    """Two rank-4 LoRAs in the GUI's LoRA folder (work/models/Lora) and a fine-tuned copy of the tiny
    base in the --model_dir, which is also where the Tools tab bakes checkpoints."""
    import torch
    from safetensors.torch import save_file

    from lorakit.models.loader import load_base_model
    from lorakit.testing import make_tiny_base

    models = site["root"] / "models"
    base = load_base_model(models / "tiny.safetensors")
    lora_dir = site["work"] / "models" / "Lora"
    paths = {}
    for key, seed in (("a", 1), ("b", 2)):
        paths[key] = lora_dir / f"tool-{key}.safetensors"
        save_file(_tool_lora(base, seed, 4), str(paths[key]), metadata={"modelspec.title": f"Tool {key}"})
    make_tiny_base(models / "tuned.safetensors", seed=1)
    # convert maps names by the standard SD1.5 layout: a LoRA on three of its real modules
    g, real = torch.Generator().manual_seed(3), {}
    for name, out, inp, conv in (
        ("lora_te_text_model_encoder_layers_0_mlp_fc1", 3072, 768, False),
        ("lora_unet_mid_block_attentions_0_proj_in", 1280, 1280, True),
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320, 320, False),
    ):
        k = (1, 1) if conv else ()
        real[f"{name}.lora_down.weight"] = torch.randn(2, inp, *k, generator=g)
        real[f"{name}.lora_up.weight"] = torch.randn(out, 2, *k, generator=g)
        real[f"{name}.alpha"] = torch.tensor(2.0)
    paths["sd15"] = lora_dir / "tool-sd15.safetensors"
    save_file(real, str(paths["sd15"]), metadata={"ss_base_model_version": "sd_v1"})
    return {**paths, "dir": lora_dir, "models": models}


def _ok(out: dict) -> list:
    assert out.get("success") is not False and not out.get("error"), out
    return out["data"]


def _lora_ranks(path: Path) -> set[int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(".lora_down.weight")}


def test_tools_resize_writes_a_named_lora_in_the_lora_folder_and_shows_its_card(site, tool_loras):
    api = Api(site["url"], "tools-resize")

    def resize(name, overwrite=False, method="none", param=0.9):
        return api(
            "tools_resize", [str(tool_loras["a"]), 2, 0, method, param, "same as the input", name, overwrite]
        )

    status, card, modules = _ok(resize("tool-a-r2"))
    out = tool_loras["dir"] / "tool-a-r2.safetensors"
    assert _lora_ranks(out) == {2}
    assert str(out.absolute()) in status and "Frobenius norm retained: mean" in status, status
    assert str(out.absolute()) in card and "dim / alpha                2 / 2" in card, card
    assert "rank 4 -> 2" in modules and "fro retained" in modules
    before = out.read_bytes()
    err = resize("tool-a-r2.safetensors").get("error") or ""  # exists, Overwrite not ticked
    assert "already exists: tick Overwrite" in err, err
    assert out.read_bytes() == before
    status, _, modules = _ok(resize("tool-a-r2", overwrite=True, method="sv_fro", param=0.5))
    assert "rank 4 -> 1" in modules or "rank 4 -> 2" in modules
    assert _lora_ranks(out) <= {1, 2} and out.read_bytes() != before


def test_tools_merge_into_one_lora_and_into_a_checkpoint(site, tool_loras):
    from safetensors import safe_open

    api = Api(site["url"], "tools-merge")
    a, b = str(tool_loras["a"]), str(tool_loras["b"])
    status, card = _ok(api("tools_merge", ["Into one LoRA: concat (exact, ranks add up)", [a, b], "0.5, 1", None,
                                          8, 0, "same as the input", "tool-ab", False]))  # fmt: skip
    out = tool_loras["dir"] / "tool-ab.safetensors"
    assert _lora_ranks(out) == {8} and str(out.absolute()) in status and "8 / 8" in card, card
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["modelspec.merged_from"] == "Tool a, Tool b"
    _ok(api("tools_merge", [MERGE_SVD, [a, b], "", None, 3, 0, "fp16", "tool-ab-svd", False]))
    assert _lora_ranks(tool_loras["dir"] / "tool-ab-svd.safetensors") == {3}
    err = api("tools_merge", [MERGE_SVD, [a, b], "1", None, 3, 0, "fp16", "x", False]).get("error") or ""
    assert "1 given for 2 LoRAs" in err
    base = tool_loras["models"] / "tiny.safetensors"
    status, card = _ok(api("tools_merge", ["Into a checkpoint (bake)", [a], "0.8", str(base), 8, 0,
                                          "same as the input", "tiny-baked", False]))  # fmt: skip
    baked = tool_loras["models"] / "tiny-baked.safetensors"  # the first --model_dir
    assert "modules" in card and "changed" in card and "tool-a.safetensors x0.8" in card, card
    with safe_open(str(baked), framework="pt") as f, safe_open(str(base), framework="pt") as g:
        assert set(f.keys()) == set(g.keys()) and f.metadata()["modelspec.title"] == "tiny-baked"
    from lorakit.gui.common import Settings  # the new checkpoint is a base model to pick

    assert str(baked) in Settings(model_dirs=(tool_loras["models"],)).model_choices()


def test_tools_extract_and_convert(site, tool_loras):
    api = Api(site["url"], "tools-extract")
    models = tool_loras["models"]
    status, card = _ok(api("tools_extract", [str(models / "tiny.safetensors"), str(models / "tuned.safetensors"),
                                            2, 0, 0.01, "fp16", "tool-x", False]))  # fmt: skip
    out = tool_loras["dir"] / "tool-x.safetensors"
    assert _lora_ranks(out) == {2} and "text encoder" in status and "tool-x" in card, (status, card)
    status, card = _ok(api("tools_convert", [str(tool_loras["sd15"]), "peft", "tool-peft", False]))
    from safetensors import safe_open

    with safe_open(str(tool_loras["dir"] / "tool-peft.safetensors"), framework="pt") as f:
        assert any(".lora_A." in k for k in f.keys())
    assert "peft names" in status and "SD1.x" in card, card


def test_tools_refuse_paths_other_extensions_and_loras_outside_the_roots(site, tool_loras):
    import shutil

    api = Api(site["url"], "tools-refuse")
    outside, work = site["outside"], site["work"]
    shutil.copy(tool_loras["a"], outside / "lora.safetensors")
    (work / "data" / "notes.txt").write_text("x")
    before = _files(site["root"])
    a = str(tool_loras["a"])

    def resize(src, name):
        return (
            api("tools_resize", [src, 2, 0, "none", 0.9, "same as the input", name, True]).get("error") or ""
        )

    for name in ("../evil", "sub/evil", "sub\\evil", str(outside / "evil"), "evil.ckpt", "evil.pt", "evil.toml",
                 "evil.ckpt.safetensors", "", "..", "nul", "COM1"):  # fmt: skip
        err = resize(a, name)
        assert "output name" in err and "without a folder or extension" in err, (name, err)
    for name in ("evil.ckpt", "../evil"):  # the same rule for every tool
        bake = [
            "Into a checkpoint (bake)",
            [a],
            "",
            str(tool_loras["models"] / "tiny.safetensors"),
            8,
            0,
            "fp16",
            name,
            True,
        ]
        errors = [
            api("tools_merge", bake).get("error") or "",
            api("tools_convert", [a, "comfy", name, True]).get("error") or "",
            api("tools_extract", [str(tool_loras["models"] / "tiny.safetensors"),
                                  str(tool_loras["models"] / "tuned.safetensors"), 2, 0, 0.01, "float", name, True]
                ).get("error") or "",
        ]  # fmt: skip
        assert all("output name" in e for e in errors), errors
    for src in (
        str(outside / "lora.safetensors"),
        "../outside/lora.safetensors",
        str(outside / "none.safetensors"),
    ):
        err = resize(src, "fine")
        assert "is outside the folders this GUI may use" in err, (src, err)
        err = (
            api("tools_merge", [MERGE_SVD, [a, src], "", None, 2, 0, "fp16", "fine", True]).get("error") or ""
        )
        assert "LoRA 2" in err and "is outside the folders" in err, err
        assert "is outside" in (api("tools_convert", [src, "kohya", "fine", True]).get("error") or "")
        assert "is outside" in (api("lora_inspect", [src]).get("error") or "")  # the LoRA info tab too
    assert "no LoRA there" in resize(str(work / "data" / "notes.txt"), "fine")
    err = api("tools_extract", [str(outside / "model.safetensors"), str(tool_loras["models"] / "tuned.safetensors"),
                                2, 0, 0.01, "float", "fine", True]).get("error") or ""  # fmt: skip
    assert "original model" in err and "is outside the folders" in err, err
    assert _files(site["root"]) == before  # nothing written anywhere
    (work / "data" / "notes.txt").unlink()
