"""The GUI end to end: `lorakit gui` in a subprocess, driven in headless Chromium by Playwright.

On the tiny model: check a dataset (and a bad folder), train from the Train tab and watch it
finish (progress, loss plot, sample), stop and resume, draw with the new LoRA from its card,
inspect it. A screenshot of each tab goes to pytest's tmp dir (and to $LORAKIT_SCREENSHOTS when set).
Under CI=true a missing Chromium or Playwright fails these tests instead of skipping them.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorakit.testing import make_dataset, make_tiny_base

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("LORAKIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def _missing(why: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"GUI browser tests cannot run: {why} (scripts/setup_gui_tests.sh installs it)")
    pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("gui")
    base = make_tiny_base(root / "tiny.safetensors")
    train_dir, reg_dir = make_dataset(root / "data", n_train=4, n_reg=2, repeats=2)
    bad = root / "bad"
    (bad / "usu bear").mkdir(parents=True)  # no <repeats>_ prefix
    shots = root / "screenshots"
    shots.mkdir()
    return {"root": root, "base": base, "train": train_dir, "reg": reg_dir, "bad": bad, "shots": shots}


@pytest.fixture(scope="module")
def server(work):
    root, port = work["root"], _free_port()
    env = dict(
        os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), GRADIO_TEMP_DIR=str(root / "gr")
    )
    cmd = [
        sys.executable, "-m", "lorakit", "gui", "--port", str(port), "--model", str(work["base"]),
        "--lora_dir", str(root / "loras"), "--runs_dir", str(root / "runs"), "--outputs_dir", str(root / "images"),
    ]  # fmt: skip
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env)
    url = None
    end = time.monotonic() + 120
    while time.monotonic() < end and proc.poll() is None:
        m = re.search(r"lorakit GUI: (http://\S+)", (root / "server.log").read_text())
        if m:
            url = m.group(1)
            break
        time.sleep(0.3)
    if url is None:
        proc.kill()
        pytest.fail(f"the GUI did not start:\n{(root / 'server.log').read_text()}")
    assert url == f"http://127.0.0.1:{port}/"
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    from lorakit.train.job import find_jobs

    for job in find_jobs(root / "runs"):  # leave no training process behind
        job.kill()


@pytest.fixture(scope="module")
def browser_page(server, work):
    if not Path(CHROMIUM).is_file():
        _missing(f"{CHROMIUM} not found")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed")
    external: list[str] = []
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(work["root"] / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        page = ctx.new_page()
        page.set_default_timeout(30000)

        def offline(route):  # the network is closed: only the GUI itself may be asked for anything
            url = route.request.url
            if url.startswith(("http://127.0.0.1", "data:", "blob:")):
                route.continue_()
            else:
                external.append(url)
                route.abort()

        page.route("**/*", offline)
        page.goto(server)
        page.wait_for_selector("#lk-intro")
        page.external_requests = external
        yield page
        ctx.close()


def shot(page, work, name: str) -> None:
    path = work["shots"] / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10000
    if os.environ.get("LORAKIT_SCREENSHOTS"):
        dest = Path(os.environ["LORAKIT_SCREENSHOTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest / path.name)


def fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input:not([type=range])").first
    box.fill(str(value))
    box.dispatch_event("input")
    box.blur()


def tab(page, name: str) -> None:
    page.locator(f"#tab-{name}-button").click()


def status_text(page) -> str:
    return page.locator("#train-status").inner_text()


def wait_status(page, pattern: str, timeout: float) -> str:
    end = time.monotonic() + timeout
    text = ""
    while time.monotonic() < end:
        text = status_text(page)
        if re.search(pattern, text, re.I | re.S):
            return text
        time.sleep(0.3)
    log = page.locator("#train-log textarea").input_value()
    raise AssertionError(f"status never matched {pattern!r}; it says:\n{text}\nlog:\n{log[-3000:]}")


# --- the tests, in page order ---------------------------------------------------------


def test_page_loads_offline_with_its_tabs(browser_page):
    page = browser_page
    for name in ("dataset", "train", "generate", "lora", "tools"):
        expect(page.locator(f"#tab-{name}-button")).to_be_visible()
    tab(page, "train")
    expect(page.locator("#train-status")).to_contain_text("No training yet")
    assert page.external_requests == [], "the page tried to reach the internet"


def test_sizes_and_learning_rate_come_from_the_base_model(browser_page, work):
    from lorakit.demo import DEMO_MODEL

    page = browser_page
    tab(page, "train")  # the tiny model: 64 px from its lorakit.arch (UNet 8x8 latents), not 512
    expect(page.locator("#cfg-resolution textarea, #cfg-resolution input").first).to_have_value("64,64")
    expect(page.locator("#cfg-model-note")).to_contain_text("native size 64x64")
    fill(page, "cfg-pretrained_model_name_or_path", DEMO_MODEL)  # picking a model fills its defaults
    expect(page.locator("#cfg-learning_rate input")).to_have_value("0.001")
    expect(page.locator("#cfg-model-note")).to_contain_text("modelspec.resolution")
    fill(page, "cfg-resolution", "512,512")
    expect(page.locator("#cfg-model-note")).to_contain_text("far from the base model's native 64x64")
    fill(page, "cfg-pretrained_model_name_or_path", work["base"])  # the 512 typed above is the user's: kept
    expect(page.locator("#cfg-model-changes")).to_contain_text("Kept as you set them: resolution 512,512")
    expect(page.locator("#cfg-resolution textarea, #cfg-resolution input").first).to_have_value("512,512")
    fill(page, "cfg-resolution", "64,64")
    expect(page.locator("#cfg-model-note")).not_to_contain_text("far from")
    tab(page, "generate")
    expect(page.locator("#gen-width input[type=number]")).to_have_value("64")
    expect(page.locator("#gen-height input[type=number]")).to_have_value("64")
    tab(page, "dataset")
    page.get_by_text("Make regularization images (the base model").click()
    expect(page.locator("#reg-size input")).to_have_value("64")
    expect(page.locator("#reg-note")).to_contain_text("native size 64x64")
    page.get_by_text("Make regularization images (the base model").click()  # closed again, as it was


@pytest.fixture(scope="module")
def other_bases(work) -> dict[str, Path]:
    """Tiny SDXL checkpoints (SGM layout, no size in their metadata: SDXL's 1024), one with NoobAI's
    v_pred/ztsnr marker keys, and a FLUX.1 dev stand-in (its key names only), in a model root."""
    import numpy as np
    from safetensors.numpy import save_file

    from lorakit.models.families.sdxl import save_sgm_checkpoint
    from lorakit.models.tiny import build_sdxl_models

    folder = work["root"] / "bases"
    folder.mkdir(exist_ok=True)
    models = build_sdxl_models()
    flux = folder / "flux1-dev.safetensors"
    keys = ("double_blocks.0.img_attn.norm.key_norm.scale", "guidance_in.in_layer.bias")
    save_file(
        {k: np.zeros(1, dtype=np.float32) for k in keys} | {"img_in.weight": np.zeros((8, 64))}, str(flux)
    )
    return {
        "sdxl": save_sgm_checkpoint(folder / "tiny-sdxl.safetensors", *models),
        "vpred": save_sgm_checkpoint(
            folder / "tiny-sdxl-vpred.safetensors", *models, markers=("v_pred", "ztsnr")
        ),
        "flux": flux,
    }


def test_the_base_models_family_shows_and_switches_the_defaults(browser_page, work, other_bases):
    page = browser_page
    tab(page, "train")
    resolution = page.locator("#cfg-resolution textarea, #cfg-resolution input").first
    max_bucket, note = page.locator("#cfg-max_bucket_reso input"), page.locator("#cfg-model-note")
    v_pred, ztsnr = (
        page.locator("#cfg-v_parameterization input"),
        page.locator("#cfg-zero_terminal_snr input"),
    )
    expect(note).to_contain_text("Family: SD1.x")
    fill(page, "cfg-pretrained_model_name_or_path", other_bases["sdxl"])
    expect(note).to_contain_text("Family: SDXL base")
    expect(resolution).to_have_value("1024,1024")
    expect(max_bucket).to_have_value("2048")
    expect(page.locator("#cfg-model-changes")).to_contain_text(
        "max_bucket_reso 2048 (SDXL images bucket up to 2048)"
    )
    expect(page.locator("#cfg-no_half_vae input")).to_be_visible()  # the SDXL section opened by itself
    expect(v_pred).not_to_be_checked()
    fill(page, "cfg-pretrained_model_name_or_path", other_bases["vpred"])
    expect(note).to_contain_text("SDXL base (v-prediction, zero terminal SNR)")
    expect(v_pred).to_be_checked()
    expect(ztsnr).to_be_checked()
    expect(page.locator("#cfg-model-changes")).to_contain_text(
        "v_parameterization on (its v_pred marker key)"
    )
    shot(page, work, "train-sdxl-vpred")
    fill(page, "cfg-pretrained_model_name_or_path", other_bases["flux"])  # refused: named, nothing changes
    expect(note).to_contain_text("FLUX.1 dev: not supported yet")
    expect(v_pred).to_be_checked()
    fill(page, "cfg-pretrained_model_name_or_path", work["base"])  # back to SD1.x: its own defaults again
    expect(note).to_contain_text("Family: SD1.x")
    expect(resolution).to_have_value("64,64")
    expect(max_bucket).to_have_value("1024")
    expect(v_pred).not_to_be_checked()
    expect(ztsnr).not_to_be_checked()


def test_dataset_tab_lists_folders_edits_captions_and_shows_problems(browser_page, work):
    page = browser_page
    tab(page, "dataset")
    fill(page, "ds-train_dir", work["train"])
    fill(page, "ds-reg_dir", work["reg"])
    page.locator("#ds-scan").click()
    page.wait_for_selector("#ds-problems :text('Ready')")
    for text in ("2_usu bear", "1_bear", "usu bear"):
        expect(page.locator("#ds-table")).to_contain_text(text)
    expect(page.locator("#ds-gallery img")).to_have_count(6)  # 4 train + 2 reg thumbnails
    expect(page.locator("#ds-gallery")).to_contain_text("usu bear")  # the captions training uses

    page.locator("#ds-gallery img").first.click()
    expect(page.locator("#ds-caption textarea")).to_have_value("usu bear")
    fill(page, "ds-caption", "usu bear, black disc")
    page.locator("#ds-save-caption").click()
    caption = work["train"] / "2_usu bear" / "usu_00.caption"
    _wait(lambda: caption.is_file(), 20, "the caption file")
    assert caption.read_text().strip() == "usu bear, black disc"
    page.wait_for_selector("#ds-gallery :text('usu bear, black disc')")
    shot(page, work, "dataset")

    expect(page.locator("#ds-image textarea, #ds-image input").first).to_have_value(re.compile("usu_00"))
    fill(page, "ds-train_dir", work["bad"])
    fill(page, "ds-reg_dir", "")
    page.locator("#ds-scan").click()
    page.wait_for_selector("#ds-problems :text('Training would stop here')")
    # the other folders' scan empties the editor: the previous image is not shown, Save cannot write it
    expect(page.locator("#ds-image textarea, #ds-image input").first).to_have_value("")
    expect(page.locator("#ds-caption textarea")).to_have_value("")
    fill(page, "ds-caption", "overwritten")
    page.locator("#ds-save-caption").click()
    expect(page.get_by_text("Click an image first").first).to_be_visible()
    assert caption.read_text().strip() == "usu bear, black disc"
    expect(page.locator("#ds-problems")).to_contain_text("folder names must be <repeats>_<prompt>")
    expect(page.locator("#ds-problems")).to_contain_text("usu bear")
    caption.unlink()


def test_reg_images_are_drawn_with_a_progress_bar(browser_page, work):
    page = browser_page
    tab(page, "dataset")
    page.get_by_text("Make regularization images (the base model").click()
    fill(page, "reg-class", "bear")
    fill(page, "reg-count", 2)
    fill(page, "reg-out", work["root"] / "made-reg")
    fill(page, "reg-steps", 2)
    fill(page, "reg-size", 64)
    page.locator("#reg-make").click()
    page.wait_for_selector("#reg-status :text('2 images')", timeout=90000)
    assert len(list((work["root"] / "made-reg" / "1_bear").glob("*.png"))) == 2
    expect(page.locator("#ds-reg_dir textarea, #ds-reg_dir input").first).to_have_value(
        str(work["root"] / "made-reg")
    )


def fill_train_tab(page, work, name: str, steps: int, every: int, samples: bool) -> None:
    tab(page, "train")
    fill(page, "cfg-train_data_dir", work["train"])
    fill(page, "cfg-reg_data_dir", "")
    fill(page, "cfg-output_name", name)
    fill(page, "cfg-resolution", "64")
    fill(page, "cfg-train_batch_size", 2)
    fill(page, "cfg-max_train_steps", steps)
    fill(page, "cfg-max_train_epochs", "")
    fill(page, "cfg-network_dim", 2)
    fill(page, "cfg-network_alpha", 2)
    fill(page, "cfg-learning_rate", "0.001")
    fill(page, "cfg-progress_every_n_steps", every)
    fill(page, "cfg-seed", 3)
    fill(page, "cfg-sample_prompts", "usu bear --s 2 --w 64 --h 64 --d 5" if samples else "")
    fill(page, "cfg-sample_every_n_epochs", "")
    fill(page, "cfg-sample_every_n_steps", max(steps // 2, 1) if samples else "")


def test_train_shows_progress_loss_samples_and_saves_the_lora(browser_page, work):
    page = browser_page
    fill_train_tab(page, work, "gui-lora", steps=8, every=2, samples=True)
    page.locator("#train-start").click()
    text = wait_status(page, r"done.*step 8/8", 180)
    lora = work["root"] / "loras" / "gui-lora.safetensors"
    assert lora.is_file() and str(lora) in text
    assert "it/s" in text and "loss" in text
    # the loss plot draws the reported points (one per 2 steps)
    page.wait_for_selector("#train-loss canvas, #train-loss svg")
    expect(page.locator("#train-loss .empty, #train-loss :text('No plot')")).to_have_count(0)
    _wait(lambda: _plot_points(page) == 4, 30, f"4 loss points (the plot has {_plot_points(page)})")
    # the latest samples, drawn at steps 4 and 8, labelled in full: which step, which prompt
    expect(page.locator("#train-samples img").nth(1)).to_be_attached()
    labels = page.locator("#train-samples .caption-label")
    expect(labels.first).to_have_text(re.compile(r"^\s*step 8 · usu bear\s*$"))
    expect(labels.nth(1)).to_have_text(re.compile(r"^\s*step 4 · usu bear\s*$"))
    cut = page.evaluate(
        "() => [...document.querySelectorAll('#train-samples .caption-label')]"
        ".filter(e => e.scrollWidth > e.clientWidth + 1).length"
    )
    assert cut == 0, "a sample label is cut off"
    expect(page.locator("#train-log textarea")).to_have_value(re.compile("LoRA saved"))
    shot(page, work, "train")


def test_stop_keeps_the_state_and_resume_finishes(browser_page, work):
    page = browser_page
    # long enough that the stop lands mid-run; 60 progress lines, as the next test's log needs
    fill_train_tab(page, work, "gui-long", steps=120, every=2, samples=False)
    page.locator("#train-start").click()
    wait_status(page, r"running.*step [1-9]\d+/120", 120)  # step 10 or later
    page.locator("#train-stop").click()
    text = wait_status(page, r"stopped", 60)
    state = work["root"] / "loras" / "gui-long-state"
    assert (state / "train_state.json").is_file(), text
    assert not (work["root"] / "loras" / "gui-long.safetensors").exists()
    page.reload()  # a reopened page shows the run as it was left
    page.wait_for_selector("#lk-intro")
    tab(page, "train")
    expect(page.locator("#train-status")).to_contain_text(re.compile(r"stopped.*gui-long", re.S | re.I))
    page.wait_for_selector("#train-resume:not([disabled])")
    page.locator("#train-resume").click()
    wait_status(page, r"done.*step 120/120", 240)
    assert (work["root"] / "loras" / "gui-long.safetensors").is_file()


def _log_at_end(page) -> bool:
    return page.evaluate(
        "() => { const t = document.querySelector('#train-log textarea');"
        " return t.scrollHeight > t.clientHeight + 40 && t.scrollTop + t.clientHeight >= t.scrollHeight - 30; }"
    )


def test_a_reopened_page_stays_on_its_tab_and_the_log_shows_its_end(browser_page, work):
    page = browser_page
    page.reload()
    page.wait_for_selector("#lk-intro")
    # the latest run is named above the tabs instead of the page switching tabs by itself
    expect(page.locator("#lk-job-notice")).to_contain_text(re.compile(r"gui-long.*ended: done", re.S))
    time.sleep(3)  # the old page jumped to the Train tab about 1.5 s after load
    expect(page.locator("#tab-dataset-button")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#tab-train-button")).to_have_attribute("aria-selected", "false")
    tab(page, "train")  # the log filled while its tab was hidden: it opens at its newest line
    expect(page.locator("#train-log textarea")).to_have_value(re.compile("LoRA saved"))
    _wait(lambda: _log_at_end(page), 10, "the log box to show its last line")


def test_the_message_follows_a_run_that_errors(browser_page, work):
    page = browser_page
    fill_train_tab(page, work, "gui-broken", steps=4, every=1, samples=False)
    fill(page, "cfg-train_data_dir", work["bad"])  # the run stops at the folder names
    page.locator("#train-start").click()
    expect(page.locator("#train-action")).to_contain_text("gui-broken")
    wait_status(page, r"error.*gui-broken", 120)
    expect(page.locator("#train-action")).to_contain_text("stopped with an error")
    expect(page.locator("#train-action")).not_to_contain_text("training goes on")
    expect(page.locator("#lk-job-notice")).to_contain_text("gui-broken ended: error")


def test_generate_with_the_new_lora_from_its_card(browser_page, work):
    page = browser_page
    tab(page, "generate")
    page.wait_for_selector("#gen-loras :text('gui-lora')")
    fill(page, "gen-prompt", "usu bear")
    expect(page.locator("#gen-loras")).to_contain_text("gui-long")
    expect(page.locator("#gen-loras")).not_to_contain_text("network")  # state folders are not LoRAs
    _click_card(page, "gui-lora")
    expect(page.locator("#gen-prompt textarea")).to_have_value("usu bear <lora:gui-lora:1>")
    fill(page, "gen-steps", 2)
    fill(page, "gen-width", 64)
    fill(page, "gen-height", 64)
    fill(page, "gen-seed", 7)
    page.locator("#gen-go").click()
    page.wait_for_selector("#gen-images img", timeout=120000)
    expect(page.locator("#gen-info textarea")).to_have_value(re.compile("Seed: 7"))
    info = page.locator("#gen-info textarea").input_value()
    assert "<lora:gui-lora:1>" in info and "Lora hashes" in info and "Size: 64x64" in info
    assert len(list((work["root"] / "images").glob("*-7.png"))) == 1
    shot(page, work, "generate")


def test_the_sdxl_demo_is_picked_shows_only_sdxl_loras_and_draws(browser_page, work):
    """As A1111: the LoRA cards follow the base model's family; the SDXL demo model is in the list."""
    import torch
    from safetensors.torch import save_file

    from lorakit.demo import DEMO_SDXL_MODEL

    name = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    tensors = {f"{name}.lora_down.weight": torch.zeros(1, 24), f"{name}.lora_up.weight": torch.zeros(96, 1)}
    meta = {"ss_base_model_version": "sdxl_base_v1-0"}
    save_file(tensors, str(work["root"] / "loras" / "xl-only.safetensors"), metadata=meta)
    page = browser_page
    tab(page, "generate")
    page.locator("#gen-lora-refresh").click()
    expect(page.locator("#gen-loras")).to_contain_text("gui-lora")  # the SD1 base: SD1 LoRAs
    expect(page.locator("#gen-loras")).not_to_contain_text("xl-only")
    page.locator("#gen-model input").click()
    page.get_by_role("option", name=str(DEMO_SDXL_MODEL)).click()  # listed without being typed
    expect(page.locator("#gen-loras")).to_contain_text("xl-only")
    expect(page.locator("#gen-loras")).not_to_contain_text("gui-lora")
    fill(page, "gen-prompt", "a frog")
    fill(page, "gen-steps", 4)
    fill(page, "gen-seed", 3)
    page.locator("#gen-go").click()
    expect(page.locator("#gen-info textarea")).to_have_value(re.compile("Model: lorakit-demo-sdxl"))
    assert "Size: 64x64" in page.locator("#gen-info textarea").input_value()  # the demo's native size
    shot(page, work, "generate-sdxl")


def test_lora_tab_shows_the_metadata(browser_page, work):
    page = browser_page
    tab(page, "lora")
    fill(page, "lora-path", work["root"] / "loras" / "gui-lora.safetensors")
    page.locator("#lora-inspect").click()
    for text in ("SD1.x", "gui-lora", "steps", "dim / alpha"):
        expect(page.locator("#lora-table")).to_contain_text(text)
    shot(page, work, "lora")
    assert page.external_requests == [], "the page tried to reach the internet"


# --- helpers ------------------------------------------------------------------------------


def expect(locator):
    """Playwright's waiting assertions, with room for a slow machine (the default is 5 s)."""
    from playwright.sync_api import expect as _expect

    _expect.set_options(timeout=30000)
    return _expect(locator)


def _wait(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _click_card(page, name: str) -> None:
    card = page.locator("#gen-loras .thumbnail-item").filter(
        has_text=re.compile(rf"^\s*{re.escape(name)}\s*$")
    )
    expect(card).to_have_count(1)
    card.click()


def _plot_points(page) -> int:
    """Vertices of the loss line that Vega drew (one per progress report)."""
    d = page.evaluate(
        "() => { const p = document.querySelector('#train-loss .mark-line path'); return p ? p.getAttribute('d') : ''; }"
    )
    return len(re.findall(r"[ML]", d or ""))


def test_the_validation_loss_is_plotted_beside_the_training_loss(browser_page, work):
    """validation_split holds out images; their loss (fixed timesteps and noise) is measured every 2
    steps, shown in the status and drawn as a second line of the loss plot."""
    page = browser_page
    fill_train_tab(page, work, "gui-val", steps=6, every=2, samples=False)
    fill(page, "cfg-validation_split", "0.25")
    fill(page, "cfg-validate_every_n_steps", 2)
    page.locator("#train-start").click()
    text = wait_status(page, r"done.*step 6/6", 180)
    assert re.search(r"validation loss [\d.]+", text), text
    page.wait_for_selector("#train-loss .mark-line path")
    _wait(
        lambda: page.locator("#train-loss .mark-line path").count() == 2,
        30,
        "two lines in the loss plot (training, validation)",
    )
    shot(page, work, "train-validation")
    fill(page, "cfg-validation_split", "0")
    fill(page, "cfg-validate_every_n_steps", "")


def test_a_preset_explains_itself_and_fills_the_fields(browser_page):
    """The preset list is the shipped TOML files; picking one says what it is for, applying it fills the
    fields (the last test in the file: the run settings above are its own)."""
    page = browser_page
    tab(page, "train")
    page.locator("#train-preset input").click()
    page.get_by_role("option", name="sdxl-12gb-character").click()
    expect(page.locator("#train-preset-note")).to_contain_text("12 GB")
    page.get_by_role("button", name="Apply preset").click()
    expect(page.locator("#cfg-network_dim input").first).to_have_value("16")
    expect(page.locator("#cfg-resolution textarea, #cfg-resolution input").first).to_have_value("1024,1024")
    expect(page.locator("#cfg-learning_rate input")).to_have_value("0.0001")
    # (checkpointing, cached text-encoder outputs, ...: in the closed Advanced section, checked by
    # tests/test_presets.py against the same files)


def test_caption_images_with_a_tagger_folder(browser_page, work):
    """The Dataset tab's Caption images: a WD14 tagger folder beside the base model (a model root),
    the trigger word first, counts and tag frequencies shown, existing captions kept."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from lorakit.testing import make_tiny_tagger

    tagger = make_tiny_tagger(work["root"] / "wd-tiny-tagger")
    page = browser_page
    tab(page, "dataset")
    fill(page, "ds-train_dir", work["train"])
    fill(page, "ds-reg_dir", "")
    fill(page, "ds-ext", ".txt")
    page.get_by_text("Caption the images with your own tagger").click()
    fill(page, "cap-model", tagger)
    fill(page, "cap-trigger", "usu bear")
    page.locator("#cap-run").click()
    status = page.locator("#cap-status")
    expect(status).to_contain_text("Wrote 4 caption file(s)", timeout=60000)
    expect(status).to_contain_text("Tag frequencies")
    expect(status).to_contain_text("4  solo")
    written = sorted((work["train"] / "2_usu bear").glob("*.txt"))
    assert len(written) == 4 and all(p.read_text().startswith("usu bear, solo, ") for p in written)
    page.wait_for_selector("#ds-gallery :text('usu bear, solo')")  # the gallery shows the new captions
    shot(page, work, "dataset-captions")
    page.locator("#cap-run").click()  # again: nothing is overwritten
    expect(status).to_contain_text("Skipped 4 image(s)")
    assert page.external_requests == [], "the page tried to reach the internet"
    for p in written:
        p.unlink()


def test_the_memory_estimate_shows_and_follows_the_batch_size(browser_page):
    """The Train tab's GPU memory estimate (train/memory_estimate.py) for the settings shown (the
    preset test's), redrawn when the batch size changes, with a warning for a card
    that is too small (late in the file: it changes the batch size and the card; only the Tools test,
    which uses neither, comes after it)."""
    page = browser_page
    tab(page, "train")
    memory = page.locator("#train-memory")
    expect(memory).to_contain_text("GPU memory: about")
    expect(memory).to_contain_text("measured on an H200")
    before = memory.inner_text()
    fill(page, "cfg-train_batch_size", 8)

    def gb(text):
        found = re.search(r"about ([\d.]+) GB", text)
        return float(found.group(1)) if found else 0.0

    # the note changes first to Gradio's "queue: ..." line over the old text: wait for the new estimate
    _wait(lambda: gb(memory.inner_text()) > gb(before), 30, "a larger estimate for batch size 8")
    page.locator("#train-card input").click()
    page.get_by_role("option", name="4 GB", exact=True).click()
    expect(memory).to_contain_text("More than the 4 GB card")


def test_tools_tab_resizes_a_lora_and_shows_its_card(browser_page, work):
    """Tools > Resize: the trained rank-2 LoRA to rank 1 under a bare name in the LoRA folder; the status
    says how much of each module's norm was kept and the card is the new file's (the last test: its
    LoRA joins the lists)."""
    page = browser_page
    tab(page, "tools")
    page.get_by_role("tab", name="Resize").click()
    fill(page, "resize-lora", work["root"] / "loras" / "gui-lora.safetensors")
    fill(page, "resize-rank", 1)
    fill(page, "resize-name", "gui-lora-r1")
    page.locator("#resize-go").click()
    status = page.locator("#resize-status")
    expect(status).to_contain_text("Frobenius norm retained", timeout=60000)
    expect(status).to_contain_text("resized to rank 1")
    out = work["root"] / "loras" / "gui-lora-r1.safetensors"
    expect(page.locator("#resize-card")).to_contain_text(str(out))
    expect(page.locator("#resize-card")).to_contain_text(re.compile(r"dim / alpha\s+1 /"))
    assert out.is_file()
    shot(page, work, "tools")
    page.locator("#resize-go").click()  # again: the file exists and Overwrite is not ticked
    expect(page.locator(".toast-body").filter(has_text="tick Overwrite")).to_be_visible()
    assert page.external_requests == [], "the page tried to reach the internet"
