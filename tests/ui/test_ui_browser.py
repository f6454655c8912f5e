"""The studio end to end in headless Chromium: upload a CSV, map its columns, check the data, pick
the tiny preset, plan memory, train a few steps while the loss curve fills in (live controls: save a
checkpoint now, change the learning rate; storage, machine use and the model view), sample, evaluate,
try the playground (tokens coloured by probability), draw attention, look at a sweep and export;
light and dark themes checked for contrast.

Opt-in (`pytest -m ui`): needs gradio and playwright (`pip install 'kerasft[ui,test]'`) and a
Chromium binary (Debian: `apt-get install chromium`; or set KERASFT_CHROMIUM). Screenshots go to
test-artifacts/ui/ (or $KERASFT_UI_ARTIFACTS).
"""

import importlib.util
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("KERASFT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
MISSING = [name for name, ok in (("gradio", importlib.util.find_spec("gradio")),
                                 ("playwright", importlib.util.find_spec("playwright")),
                                 ("a chromium binary (apt-get install chromium, or set KERASFT_CHROMIUM)", CHROMIUM))
           if not ok]

pytestmark = [
    pytest.mark.ui,
    pytest.mark.skipif(bool(MISSING), reason=f"browser test needs {', '.join(MISSING)}"),
]

ARTIFACTS = Path(os.environ.get("KERASFT_UI_ARTIFACTS", ROOT / "test-artifacts" / "ui"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from kerasft.ui.app import launch

    port = _free_port()
    app = launch(tmp_path_factory.mktemp("studio"), port=port, block=False)
    yield f"http://127.0.0.1:{port}", app
    for job in app.studio.jobs.values():
        job.interrupt(timeout=10)
    app.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def _wait_text(page, elem_id: str, pattern: str, timeout: float = 240) -> str:
    """Waits until #elem_id's text matches `pattern`; fails on an error message in it."""
    deadline = time.time() + timeout
    text = ""
    while time.time() < deadline:
        text = _text(page, elem_id)
        if re.search(pattern, text):
            return text
        if "Error:" in text:
            pytest.fail(f"#{elem_id}: {text}")
        time.sleep(0.5)
    pytest.fail(f"#{elem_id} never matched {pattern!r}; last text: {text!r}")


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _contrast(page, selector: str) -> float:
    """WCAG contrast ratio of an element's text colour against the page background."""
    return page.evaluate(
        """(selector) => {
            const el = document.querySelector(selector);
            const lum = (c) => {
                const [r, g, b] = c.match(/[\\d.]+/g).slice(0, 3).map(Number).map((v) => {
                    v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
                return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
            let bg = el, color = getComputedStyle(el).color;
            while (bg && /rgba\\(.*, 0\\)|transparent/.test(getComputedStyle(bg).backgroundColor)) bg = bg.parentElement;
            const back = getComputedStyle(bg || document.body).backgroundColor;
            const [a, b] = [lum(color), lum(back)];
            return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
        }""",
        selector,
    )


def test_studio_upload_train_evaluate_export(studio, browser, tiny_preset, tmp_path):
    url, app = studio
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(url)
    page.locator("#run_name input, #run_name textarea").first.fill("faq-tiny")
    _shot(page, "01_home_light")
    assert _contrast(page, "h1") > 4.5

    # The tiny local preset first: the data check reads the chosen model's tokenizer.
    _tab(page, "Model")
    page.locator("#local_preset input, #local_preset textarea").first.fill(str(tiny_preset))

    # Dataset: upload the shipped FAQ spreadsheet (as CSV), columns are guessed, then checked.
    _tab(page, "Dataset")
    page.locator("#check_data").click()  # nothing uploaded yet: a clear message, not a traceback
    page.get_by_text("Error: upload a data file first").first.wait_for()
    csv = tmp_path / "FAQ horno (copia).csv"
    shutil.copy(ROOT / "data" / "examples" / "faq_horno.csv", csv)
    page.locator("#upload input[type=file]").set_input_files(str(csv))
    status = _wait_text(page, "upload_status", r"saved as")
    assert "FAQ_horno_copia_.csv" in status and "pregunta" in status
    meta = page.locator("#col_meta input").first
    meta.click()
    page.get_by_role("option", name="dificultad").click()
    page.keyboard.press("Escape")
    page.locator("#check_data").click()
    page.wait_for_function("() => !document.querySelector('#data_report').innerText.includes('upload a data file')",
                           timeout=240_000)
    report = _wait_text(page, "data_report", r"no errors|errors")
    assert "no errors" in report and "train" in report
    page.locator("#histogram img").wait_for()
    assert "train (" in _text(page, "split_preview") and "validation (" in _text(page, "split_preview")
    _shot(page, "02_dataset")

    # Model: a few steps; schedule plot and memory plan.
    _tab(page, "Model")
    _set_number(page, "epochs", 20000)
    _set_number(page, "max_steps", 12)  # the run length, in place of the epochs
    _set_number(page, "checkpoint_every", 3)
    _set_number(page, "batch_size", 2)
    _set_number(page, "sequence_length", 128)
    page.locator("#show_schedule").click()
    page.locator("#schedule_plot canvas, #schedule_plot svg").first.wait_for()
    page.locator("#plan_memory").click()
    badge = _wait_text(page, "plan_badge", r"fits|does not fit|failed", timeout=180)
    assert "fits" in badge and "failed" not in badge and "suggested batch size" in badge
    _shot(page, "03_model")

    # Training, a long run first: pause (stops once its next checkpoint is complete), resume
    # (`kerasft train --resume` continues from it), stop. The runs are `kerasft train` subprocesses.
    _set_number(page, "max_steps", 100000)
    _tab(page, "Training")
    page.locator("#start_training").click()
    _wait_text(page, "train_status", r"started|training")
    page.locator("#pause_training").click()
    paused = _wait_text(page, "train_status", r"paused|finished|stopped", timeout=300)
    assert "paused" in paused, paused
    run_dir = app.studio.ws.run_dir("faq-tiny")
    stopped_at = int(re.search(r"step (\d+)", paused).group(1))
    checkpoint = max(int(p.name) for p in run_dir.checkpoints.iterdir() if p.name.isdigit())
    assert 3 <= checkpoint <= stopped_at < 100000 and checkpoint % 3 == 0, paused
    _shot(page, "04a_paused")
    page.locator("#resume_training").click()
    job_log = lambda: app.studio.jobs[("faq-tiny", "train")].log_text(100000)  # noqa: E731
    deadline = time.time() + 300
    while f"resuming at step {checkpoint}/100000" not in job_log() and time.time() < deadline:
        time.sleep(0.5)
    assert f"resuming at step {checkpoint}/100000" in job_log()
    _wait_text(page, "train_status", rf"training · step (?!{checkpoint} )\d+")  # steps after the checkpoint
    # Live controls (kerasft control): the job takes each request at the end of its next step.
    page.get_by_text("Live controls: the running job").first.click()  # an accordion, closed at first
    page.locator("#save_now").click()
    _set_number(page, "new_lr", 0.0001)
    page.locator("#change_lr").click()
    deadline = time.time() + 300
    while not ("(kerasft control save)" in job_log() and "(kerasft control lr)" in job_log()) and time.time() < deadline:
        time.sleep(0.5)
    assert "(kerasft control save)" in job_log() and "learning rate 0.0001 from step" in job_log()
    assert "checkpoints" in _text(page, "storage") and "CPU" in _text(page, "machine_usage")
    page.locator("#stop_training").click()
    assert "stopped" in _wait_text(page, "train_status", r"stopped|finished|failed")

    # Then a short run to the end (Start replaces the run dir): the curve, tokens/s, ETA, progress.
    _tab(page, "Model")
    _set_number(page, "max_steps", 12)
    _tab(page, "Training")
    page.locator("#start_training").click()
    _wait_text(page, "train_status", r"started|training")
    status = _wait_text(page, "train_status", r"finished|failed|stopped", timeout=300)
    assert "finished" in status and "step 12 / 12" in status, status
    assert "tokens/s" in status and "ETA" in status
    steps = [json.loads(line)["step"] for line in run_dir.metrics.read_text().splitlines()]
    assert steps == list(range(1, 13)), steps
    page.locator("#loss_plot canvas, #loss_plot svg").first.wait_for()
    assert "100%" in page.locator("#progress_bar .kft-bar").get_attribute("title")
    assert re.search(r"checkpoints \d", _wait_text(page, "storage", r"disk free"))
    page.get_by_text("Model view before training").first.click()
    page.locator("#model_view_button").click()
    assert "LoRA r" in _wait_text(page, "model_view_summary", r"trainable [\d,]+ of", timeout=240)
    _shot(page, "04_training")
    page.locator("#sample_generations").click()
    _wait_text(page, "samples", r"response")
    _shot(page, "05_samples")

    # Evaluation: base vs fine-tuned from eval_base.json / eval.json, report, playground.
    _tab(page, "Evaluation")
    page.locator("#evaluate").click()
    _wait_text(page, "eval_status", r"done", timeout=300)
    table = _text(page, "metrics_table")
    assert "base" in table and "fine-tuned" in table and "exact_match" in table
    assert "Worst" in _text(page, "report_md") or "worst" in _text(page, "report_md").lower()
    page.locator("#playground_prompt textarea").fill("¿Abrís los domingos?")
    page.locator("#generate").click()
    page.wait_for_function("() => { const t = document.querySelector('#playground_output textarea');"
                           " return t && t.value && t.value !== 'generating ...'; }", timeout=120_000)
    answer = page.locator("#playground_output textarea").input_value()
    assert answer and "Error:" not in answer
    tokens = page.locator("#playground_tokens span.kerasft-token")
    tokens.first.wait_for()
    assert 0 <= float(tokens.first.get_attribute("data-prob")) <= 1 and tokens.first.get_attribute("title")
    _shot(page, "06_evaluation")
    page.locator("#show_results").click()
    _wait_text(page, "eval_status", r"results in")
    assert "fine-tuned" in _text(page, "metrics_table")

    # Explore: the attention map of a prompt, drawn by `kerasft attention` from the tuned run.
    _tab(page, "Explore")
    page.locator("#attention_source input, #attention_source textarea").first.fill("faq-tiny")
    page.locator("#attention_prompt textarea").fill("¿Abrís los domingos?")
    page.locator("#attention_button").click()
    assert "heads" in _wait_text(page, "attention_status", r"attends most to", timeout=240)
    page.locator("#attention_png img").wait_for()
    _shot(page, "06b_attention")

    # Sweeps: a two-trial `kerasft sweep` written into the workspace, its table and plot.
    from kerasft.sweep import sweep

    qa = ROOT / "data" / "qa_es"
    sweep(str(ROOT / "configs/quickstart.yaml"), ["lora.rank=2,4", f"model.preset={tiny_preset}", f"data.train={qa}/train.json",
                                                  f"data.eval={qa}/heldout.json", f"data.validation={qa}/heldout.json",
                                                  "train.max_steps=2", "data.eval_limit=2", "eval.max_new_tokens=2",
                                                  "train.plots=false"],
          out=app.studio.ws.root / "sweeps" / "rank")
    _tab(page, "Sweeps")
    page.locator("#sweep_refresh").click()
    page.locator("#sweep_folder input").first.click()
    page.get_by_role("option", name="sweeps/rank").click()
    assert "Rule: highest validation f1" in _wait_text(page, "sweep_summary", r"Rule:")
    assert "t001" in _text(page, "sweep_table")
    page.locator("#sweep_plots img").first.wait_for()
    _shot(page, "06c_sweeps")

    # Export: merged Hugging Face safetensors (checked in transformers), with download links.
    _tab(page, "Export")
    page.locator("#export").click()
    _wait_text(page, "export_status", r"exported to", timeout=300)
    assert "model.safetensors" in _text(page, "export_files").replace("\n", "")
    assert "Gemma" in _text(page, "model_card")
    _shot(page, "07_export")
    assert run_dir.has_adapter
    assert (app.studio.ws.export_dir("faq-tiny", "hf") / "model.safetensors").is_file()

    # Dark theme: same page, text still readable.
    dark = browser.new_page(viewport={"width": 1400, "height": 1000})
    dark.goto(url + "/?__theme=dark")
    dark.get_by_role("tab", name="Dataset").wait_for()
    assert _contrast(dark, "h1") > 4.5
    assert dark.evaluate("document.body.classList.contains('dark') || "
                         "document.querySelector('.dark') !== null")
    _shot(dark, "08_home_dark")
    _tab(dark, "Model")
    _shot(dark, "09_model_dark")
