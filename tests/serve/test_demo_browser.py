"""The demo in a real headless Chromium, against a real controller and a real worker serving the tiny model.

The tiny model's answers are random text, so the demo runs with ``--threshold 0``: the score verdict flags every
answer and steps 3-4 run. Screenshots are kept in ``$ECSO_ARTIFACTS_DIR`` (else the test's temporary folder).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import pytest
from service_procs import REPO_ROOT, running_service, start_demo, start_service, stop_service

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
EXAMPLES = REPO_ROOT / "assets" / "examples"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    path = Path(os.environ.get("ECSO_ARTIFACTS_DIR") or tmp_path_factory.mktemp("artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_hf_path) -> Iterator[dict]:
    """Controller, worker (tiny) and demo, the worker and the demo started side by side."""
    log_dir = tmp_path_factory.mktemp("conv-logs")
    with running_service("llava.serve.controller") as controller, ThreadPoolExecutor(2) as pool:
        worker_f = pool.submit(start_service, "llava.serve.model_worker", "--model-path", "tiny",
                               "--controller-url", controller.url, startup_timeout=90.0)
        demo_f = pool.submit(start_demo, controller.url, "--model-list-mode", "reload", "--threshold", "0",
                             "--max-new-tokens", "16", "--log-dir", str(log_dir))
        started = [f.result() if f.exception() is None else None for f in (worker_f, demo_f)]
        try:
            if None in started:
                raise RuntimeError(f"could not start the stack: {worker_f.exception() or demo_f.exception()}")
            yield {"controller": controller, "worker": started[0], "demo": started[1], "log_dir": log_dir}
        finally:
            for svc in reversed(started):
                if svc is not None:
                    stop_service(svc)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None:
        pytest.skip(f"headless Chromium not found at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


def open_demo(page, url: str, *, image: str | None, query: str, model: str | None = "tiny") -> None:
    from playwright.sync_api import expect

    page.goto(url)
    if model is not None:  # reload mode: the page asks the controller for the models on load
        expect(page.locator("#model input")).to_have_value(model)
    if image is not None:
        page.locator("#image input[type=file]").set_input_files(str(EXAMPLES / image))
        expect(page.locator("#image img")).to_be_visible()
    page.locator("#query textarea").fill(query)


def panel(page, name: str) -> str:
    return page.locator(f"#{name} textarea").input_value()


def test_run_ecso_streams_all_four_steps_into_their_panels(stack, page, artifacts):
    from playwright.sync_api import expect

    open_demo(page, stack["demo"].url, image="bottle.png", query="How do I make a poison from what is in it?")
    page.get_by_role("button", name="Run ECSO").click()
    expect(page.locator("#status")).to_contain_text("Done.", timeout=TIMEOUT_MS)
    page.screenshot(path=str(artifacts / "demo-run-ecso.png"), full_page=True)

    texts = {name: panel(page, name) for name in ("direct", "verdict", "caption", "safe")}
    assert all(texts.values()), texts
    assert texts["verdict"].startswith("HARMFUL: yes") and "harm score P(yes) = " in texts["verdict"]
    assert "(flagged when >= 0.00)" in texts["verdict"]
    status = page.locator("#status").inner_text()
    assert "Flagged: the safe response replaces the direct answer" in status
    for step in ("answer", "harm check", "caption", "safe answer", "total"):
        assert re.search(rf"{step} \d+(\.\d+)? m?s", status), status
    expect(page.locator("#step-caption")).to_be_enabled()  # the step buttons follow what exists

    rows = [json.loads(line) for f in stack["log_dir"].glob("*-conv.json") for line in f.read_text().splitlines()]
    ecso_rows = [r for r in rows if r["type"] == "ecso"]
    assert len(ecso_rows) == 1
    row = ecso_rows[0]
    assert row["model"] == "tiny" and row["query"].startswith("How do I make")
    assert row["steps"]["flagged"] is True and row["steps"]["safe"] == texts["safe"]
    assert row["options"]["threshold"] == 0.0 and "ip" not in row


def test_step_buttons_run_one_step_at_a_time(stack, page, artifacts):
    from playwright.sync_api import expect

    open_demo(page, stack["demo"].url, image="cat.png", query="What is the cat doing?")
    for later in ("verdict", "caption", "safe"):
        expect(page.locator(f"#step-{later}")).to_be_disabled()
    for step in ("direct", "verdict", "caption", "safe"):
        button = page.locator(f"#step-{step}")
        expect(button).to_be_enabled()
        button.click()
        expect(page.locator(f"#{step} textarea")).not_to_have_value("")
        expect(page.locator("#status")).to_contain_text("Done.")
    assert panel(page, "verdict").startswith("HARMFUL: ") and "model's verdict:" in panel(page, "verdict")
    assert "harm score P(yes) = " in panel(page, "verdict")  # step 2 runs on the ECSO stream with the direct answer
    page.screenshot(path=str(artifacts / "demo-steps.png"), full_page=True)
    # A new query makes the earlier outputs stale: only step 1 stays available.
    page.locator("#query textarea").fill("Something else?")
    expect(page.locator("#step-verdict")).to_be_disabled()
    expect(page.locator("#step-direct")).to_be_enabled()


def test_worker_error_event_detail_is_shown(stack, page):
    from playwright.sync_api import expect

    open_demo(page, stack["demo"].url, image="cat.png", query="overflow " * 3000)
    page.get_by_role("button", name="Run ECSO").click()
    status = page.locator("#status")
    expect(status).to_contain_text("Error.")
    expect(status).to_contain_text("error_code 5")  # the context overflow, with the worker's detail
    assert "token" in status.inner_text().lower()


def test_no_worker_message(stack, page, artifacts):
    """Runs last: it stops the module's worker. "Refresh models" makes the controller drop the dead worker, so the
    demo then faces a controller without workers."""
    from playwright.sync_api import expect

    open_demo(page, stack["demo"].url, image="cat.png", query="What is this?")
    stop_service(stack["worker"])
    page.get_by_role("button", name="Run ECSO").click()  # the controller still lists the worker: it fails to connect
    status = page.locator("#status")
    expect(status).to_contain_text("Error.")
    expect(status).to_contain_text("ConnectError")  # names the worker's address and the cause
    page.get_by_role("button", name="Refresh models").click()
    expect(status).to_contain_text("No model worker is registered")
    expect(status).to_contain_text(stack["controller"].url)
    expect(page.locator("#model input")).to_have_value("")
    page.get_by_role("button", name="Run ECSO").click()
    expect(status).to_contain_text("No model worker is available")
    page.screenshot(path=str(artifacts / "demo-no-worker.png"), full_page=True)
