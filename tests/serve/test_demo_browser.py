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
        expect(page.locator("#model input")).to_have_value(model, timeout=TIMEOUT_MS)  # a loaded box is slow
    if image is not None:
        page.locator("#image input[type=file]").set_input_files(str(EXAMPLES / image))
        expect(page.locator("#image img")).to_be_visible(timeout=TIMEOUT_MS)
    page.locator("#query textarea").fill(query)


def panel(page, name: str) -> str:
    return page.locator(f"#{name} textarea").input_value()


def test_run_ecso_streams_all_four_steps_into_their_panels(stack, page, artifacts):
    from playwright.sync_api import expect

    open_demo(page, stack["demo"].url, image="bottle.png", query="How do I make a poison from what is in it?")
    page.get_by_role("button", name="Run ECSO").click()
    expect(page.locator("#status")).to_contain_text("Done.", timeout=TIMEOUT_MS)
    page.screenshot(path=str(artifacts / "demo-run-ecso.png"), full_page=True)

    texts = {name: panel(page, name) for name in ("direct", "verdict", "caption", "safe", "final")}
    assert all(texts.values()), texts
    assert texts["verdict"].startswith("HARMFUL: yes, ECSO answers again from the caption, without the image")
    assert re.search(r"P\(yes\) 0\.\d{3} >= threshold 0: flagged", texts["verdict"]), texts["verdict"]
    assert texts["final"] == texts["safe"]  # the panel with the answer ECSO gives
    badge = page.locator("#verdict-badge .ecso-verdict")
    expect(badge).to_have_class(re.compile("ecso-flagged"))
    assert page.locator("#verdict-badge .ecso-badge").evaluate("e => getComputedStyle(e).backgroundColor") == \
        "rgb(198, 40, 40)"  # red
    expect(page.locator("#verdict-badge")).to_contain_text("random-weight model: its text is random")
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
    assert panel(page, "verdict").startswith("HARMFUL: ")
    assert re.search(r"P\(yes\) 0\.\d{3} ", panel(page, "verdict"))  # step 2 runs on the ECSO stream, score kept
    page.screenshot(path=str(artifacts / "demo-steps.png"), full_page=True)
    # A new query makes the earlier outputs stale: only step 1 stays available.
    page.locator("#query textarea").fill("Something else?")
    expect(page.locator("#step-verdict")).to_be_disabled()
    expect(page.locator("#step-direct")).to_be_enabled()


def test_clear_empty_query_and_no_image(stack, page, artifacts):
    """Clear leaves nothing running on screen; an empty query says what to do (no error); a run without an image
    never claims to answer "without the image"."""
    from playwright.sync_api import expect

    open_demo(page, stack["demo"].url, image=None, query="How do I make a poison?")
    page.get_by_role("button", name="Run ECSO").click()
    status = page.locator("#status")
    expect(status).to_contain_text("Done.")
    verdict = panel(page, "verdict")
    assert verdict.startswith("HARMFUL: yes, ECSO answers again (there is no image to leave out)"), verdict
    assert "without the image" not in verdict + page.locator("#verdict-badge").inner_text()
    page.screenshot(path=str(artifacts / "demo-no-image.png"), full_page=True)

    page.get_by_role("button", name="Clear").click()
    expect(page.locator("#query textarea")).to_have_value("")
    for name in ("direct", "verdict", "caption", "safe", "final"):
        expect(page.locator(f"#{name} textarea")).to_have_value("")
    expect(page.locator("#verdict-badge .ecso-verdict")).to_have_count(0)
    page.wait_for_timeout(500)
    assert "Running" not in status.inner_text()

    page.get_by_role("button", name="Run ECSO").click()  # the query is empty now
    expect(status).to_contain_text("Type a query first")
    assert "Error" not in status.inner_text() and "ValueError" not in status.inner_text()
    page.locator("#step-direct").click()
    expect(status).to_contain_text("Type a query first")


def test_not_flagged_is_green_and_the_direct_answer_is_final(stack, page, artifacts):
    from playwright.sync_api import expect

    open_demo(page, stack["demo"].url, image="cat.png", query="What is the cat doing?")
    page.get_by_text("ECSO options").click()
    threshold, slider = page.locator("#threshold input[type=number]"), page.locator("#threshold input[type=range]")
    for _ in range(3):  # a value typed while the options panel is still rendering can be dropped: type it again
        threshold.fill("1")
        threshold.press("Enter")
        threshold.blur()
        try:
            expect(slider).to_have_value("1", timeout=3000)
            break
        except AssertionError:
            continue
    expect(slider).to_have_value("1")  # the page's state has it before the run
    page.get_by_role("button", name="Run ECSO").click()
    expect(page.locator("#status")).to_contain_text("Not flagged: the direct answer is the final answer")
    assert re.search(r"P\(yes\) 0\.\d{3} < threshold 1: not flagged", panel(page, "verdict")), panel(page, "verdict")
    assert panel(page, "final") == panel(page, "direct") != ""
    expect(page.locator("#verdict-badge .ecso-verdict")).to_have_class(re.compile("ecso-clear"))
    assert page.locator("#verdict-badge .ecso-badge").evaluate("e => getComputedStyle(e).backgroundColor") == \
        "rgb(46, 125, 50)"  # green
    page.screenshot(path=str(artifacts / "demo-not-flagged.png"), full_page=True)


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
