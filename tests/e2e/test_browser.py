"""The dashboard in a real browser: Debian's Chromium driven by Playwright against `streamlit run`.

Each page is opened as a person would, its main action run, and what shows is asserted (images,
charts, no error box, no exception). Screenshots go to docs/ (shown in the README).
"""

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", "--disable-quic"]
SLOW = 180_000  # ms: the first run of a page traces the model's graph on a 2-core CPU

pytestmark = pytest.mark.slow
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if CHROMIUM is None:
    pytest.skip("no Chromium on this machine (apt-get install chromium)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "streamlit.log"
    env = {**os.environ, "CNN_AUDIT_DATA": str(tmp_path_factory.mktemp("data")), "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "dashboard.py", "--server.headless", "true",
             "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false"],
            # the file watcher is off by the app's own .streamlit/config.toml (the last test checks the log)
            cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        process.terminate()
        pytest.fail(f"streamlit did not start: {log.read_text()[-2000:]}")
    yield url, log
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


def _open(browser, url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(SLOW)
    page.goto(url)
    return context, page


def _settle(page):
    """Wait until the script run is over (the running indicator is gone)."""
    page.wait_for_timeout(500)
    page.wait_for_function("!document.querySelector('[data-testid=stStatusWidget]')", timeout=SLOW)


def _assert_clean(page):
    assert page.locator("[data-testid=stException]").count() == 0, page.locator("[data-testid=stException]").all_inner_texts()
    errors = page.locator("[data-testid=stAlertContentError]")
    assert errors.count() == 0, errors.all_inner_texts()
    assert "Traceback" not in page.content()


def _screenshot(page, name):
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / name))


def test_activations_page_on_vgg16_and_chelsea(server, browser):
    # First in the file on purpose: a page URL as a fresh server's first request (Streamlit's legacy
    # pages/ mode would skip the frame; pages.common.current() recovers).
    url, _ = server
    context, page = _open(browser, f"{url}/activations?model=demo:vgg16&image=chelsea")
    page.get_by_text("One channel over the image").wait_for()
    _settle(page)
    page.locator("[data-testid=stMain] img").nth(3).wait_for()  # montage, image, channel, overlay
    _assert_clean(page)
    _screenshot(page, "activations.png")
    page.get_by_role("button", name="Compute statistics").click()
    chart = page.locator(".js-plotly-plot").first
    chart.wait_for()
    _settle(page)
    _assert_clean(page)
    assert page.get_by_text("Dead filters per layer").is_visible()
    chart.scroll_into_view_if_needed()
    _screenshot(page, "dead_filters.png")
    context.close()


def test_model_page_on_the_default_model(server, browser):
    url, _ = server
    context, page = _open(browser, url)
    page.get_by_text("Parameters per layer").wait_for()
    page.locator(".js-plotly-plot").first.wait_for()
    _settle(page)
    _assert_clean(page)
    assert page.get_by_text("Model: demo:shapes").is_visible()
    assert page.locator("[data-testid=stMetricValue]").first.inner_text() == "15"  # layers
    _screenshot(page, "model.png")
    context.close()


@pytest.mark.parametrize("layer", ["block1_conv1", "block5_conv3"])
def test_filters_page_grows_vgg16_galleries_with_the_no_response_count(server, browser, layer):
    url, _ = server
    context, page = _open(browser, f"{url}/filters?model=demo:vgg16&layer={layer}")
    page.get_by_role("button", name="Grow the gallery").click()
    heading = page.get_by_text(f"{layer}: 8 filters, ")
    heading.wait_for()
    _settle(page)
    _assert_clean(page)
    assert "with no response" in heading.inner_text()
    heading.scroll_into_view_if_needed()
    _screenshot(page, f"filters_{layer}.png")
    context.close()


def test_attribution_page_on_a_demo_shape_with_its_trust_table(server, browser):
    url, _ = server
    context, page = _open(browser, f"{url}/attribution?model=demo:shapes-gap&image=shape+3")
    page.get_by_text("Can the maps be trusted?").wait_for()
    _settle(page)
    _assert_clean(page)
    assert page.get_by_text("Why star?").first.is_visible()
    page.locator("[data-testid=stMain] img").nth(5).wait_for()  # the image and five overlays
    page.get_by_text("Can the maps be trusted?").first.scroll_into_view_if_needed()  # the overlays above it
    _screenshot(page, "attribution_shapes.png")
    context.close()


def test_filters_page_refuses_bad_filter_indices_with_a_message(server, browser):
    url, _ = server
    context, page = _open(browser, f"{url}/filters")
    page.get_by_text("First-layer weights").wait_for()
    page.get_by_text("By index", exact=True).click()
    field = page.get_by_label("Indices (comma-separated)")
    field.fill("1, 99")
    field.press("Enter")
    page.get_by_text("has filters 0 to 31").wait_for()
    assert page.locator("[data-testid=stException]").count() == 0
    context.close()


def test_pruning_page_on_the_demo_model_offers_a_smaller_model(server, browser):
    url, _ = server
    context, page = _open(browser, f"{url}/pruning")
    page.get_by_role("button", name="Download the pruned model (.keras)").wait_for()
    _settle(page)
    _assert_clean(page)
    assert page.get_by_text("Top-1 agreement", exact=True).is_visible()
    assert page.locator(".js-plotly-plot").count() == 2  # candidates per layer, filter scatter
    _screenshot(page, "pruning.png")
    context.close()


def test_pruning_page_on_vgg16_with_a_filters_evidence(server, browser):
    url, _ = server
    context, page = _open(browser, f"{url}/pruning?model=demo:vgg16&scatter_layer=block5_conv3&evidence=441")
    page.get_by_text("Relative feature error", exact=True).wait_for()
    page.get_by_text("Filter 441 of block5_conv3").wait_for()
    _settle(page)
    _assert_clean(page)
    page.get_by_text("Evidence for filter").scroll_into_view_if_needed()
    _screenshot(page, "pruning_vgg16.png")
    context.close()


def test_attribution_page_for_a_vgg16_filter_on_chelsea(server, browser):
    url, _ = server
    context, page = _open(browser, f"{url}/attribution?model=demo:vgg16&image=chelsea&filter=441"
                                   "&methods=Saliency&methods=Grad-CAM&methods=Grad-CAM%2B%2B")
    page.get_by_text("Why filter 441 of block5_conv3?").wait_for()
    page.locator("[data-testid=stMain] img").nth(3).wait_for()  # the image and three overlays
    _settle(page)
    _assert_clean(page)
    page.get_by_text("Why filter 441").scroll_into_view_if_needed()
    _screenshot(page, "attribution_vgg16.png")
    context.close()


def test_report_page_builds_a_report_to_download(server, browser):
    url, _ = server
    context, page = _open(browser, f"{url}/report?count=12&report_steps=3&report_filters=4&report_images=2&report=1")
    page.get_by_role("button", name="Download the report (HTML)").wait_for()
    _settle(page)
    _assert_clean(page)
    with page.expect_download() as download:
        page.get_by_role("button", name="Download the report (HTML)").click()
    saved = download.value.path()
    text = Path(saved).read_text()
    assert "<h2>Pruning candidates</h2>" in text and "<th>Images</th><td>12</td>" in text
    _screenshot(page, "report.png")
    context.close()


def _upload_model(browser, url, path):
    """Open the dashboard and upload a model file in the sidebar, as a person would."""
    context, page = _open(browser, url)
    page.get_by_text("Parameters per layer").wait_for()
    page.locator("[data-testid=stSidebar] [data-testid=stSelectbox]").first.click()
    page.get_by_role("option", name="Upload a .keras / .h5 file…").click()
    page.locator("[data-testid=stSidebar] input[type=file]").set_input_files(str(path))
    return context, page


def test_a_corrupt_model_upload_gives_a_clear_message(server, browser, tmp_path):
    url, _ = server
    corrupt = tmp_path / "broken.keras"
    corrupt.write_bytes(b"PK\x03\x04 this zip stops here")
    context, page = _upload_model(browser, url, corrupt)
    page.get_by_text("corrupt or truncated").wait_for()
    assert page.locator("[data-testid=stException]").count() == 0
    context.close()


def test_an_undecodable_image_upload_gives_a_clear_message(server, browser, tmp_path):
    url, _ = server
    context, page = _open(browser, f"{url}/activations")
    page.get_by_text("One channel over the image").wait_for()
    page.locator("[data-testid=stSidebar]").get_by_text("Upload", exact=True).click()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = tmp_path / "red.png"
    buffer = io.BytesIO()
    Image.fromarray(np.full((80, 80, 3), (200, 30, 30), np.uint8)).save(buffer, format="PNG")
    good.write_bytes(buffer.getvalue())
    page.locator("[data-testid=stSidebar] input[type=file]").set_input_files([str(broken), str(good)])
    page.get_by_text("broken.png: cannot be read as an image").wait_for()
    _settle(page)
    assert page.locator("[data-testid=stException]").count() == 0
    assert page.get_by_text("One channel over the image").is_visible()  # the good image still works
    context.close()


def test_two_sessions_at_once_do_not_disturb_each_other_and_share_one_model(server, browser):
    url, log = server
    first, page_a = _open(browser, f"{url}/?model=demo:shapes")
    second, page_b = _open(browser, f"{url}/?model=demo:vgg16")
    page_a.get_by_text("Model: demo:shapes").wait_for()
    page_b.get_by_text("Model: demo:vgg16").wait_for()
    _settle(page_a)
    _settle(page_b)
    assert page_a.locator("[data-testid=stMetricValue]").nth(2).inner_text() != \
        page_b.locator("[data-testid=stMetricValue]").nth(2).inner_text()
    third, page_c = _open(browser, f"{url}/?model=demo:shapes")
    page_c.get_by_text("Model: demo:shapes").wait_for()
    _settle(page_c)
    loads = [line for line in log.read_text().splitlines() if "loaded model demo:shapes (" in line]
    assert len(loads) == 1, loads  # every session shares the one loaded model
    for context in (first, second, third):
        context.close()


def _pick(page, label, option):
    """Choose an option of a Streamlit selectbox by its label, as a person would."""
    page.get_by_label(label, exact=True).click()
    page.get_by_role("option", name=option, exact=True).click()
    _settle(page)


def _main_pixels(page, path):
    """The page's main area once every element and image has been drawn."""
    _settle(page)
    page.wait_for_function("!document.querySelector('[data-testid=stSkeleton]') && "
                           "[...document.images].every(image => image.complete)", timeout=SLOW)
    page.wait_for_timeout(1000)
    page.mouse.move(0, 0)
    page.locator("[data-testid=stMain]").screenshot(path=str(path))
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_a_link_made_in_one_browser_opens_the_same_view_in_another(server, browser, tmp_path):
    url, _ = server
    first, page_a = _open(browser, f"{url}/activations?model=demo:shapes")
    page_a.get_by_text("One channel over the image").wait_for()
    _settle(page_a)
    _pick(page_a, "Layer", "block2_conv1")
    _pick(page_a, "Current image", "shape 9")
    page_a.get_by_text("All 64 channels of block2_conv1").wait_for()
    page_a.get_by_role("button", name="Share this view").click()
    link = page_a.locator("[data-testid=stCode] code").last.inner_text().strip()
    assert link == page_a.url, (link, page_a.url)  # the address bar is the link too
    assert "/activations?" in link and "layer=block2_conv1" in link and "image=shape+9" in link
    page_a.keyboard.press("Escape")
    before = _main_pixels(page_a, tmp_path / "a.png")

    second, page_b = _open(browser, link)  # another browser context: no shared cookies or state
    page_b.get_by_text("All 64 channels of block2_conv1").wait_for()
    _settle(page_b)
    after = _main_pixels(page_b, tmp_path / "b.png")
    assert before.shape == after.shape
    differing = np.mean(np.abs(before - after).max(axis=-1) > 16)
    assert differing < 0.005, f"{differing:.2%} of the pixels differ"
    _screenshot(page_b, "link_reopened.png")
    for context in (first, second):
        context.close()


def test_an_uploaded_transfer_learning_model_gets_grad_cam_for_a_class_and_the_pruning_page(server, browser,
                                                                                             tmp_path):
    from audit.zoo import architectures

    model_file = tmp_path / "cats_vs_dogs.keras"  # TF's transfer-learning tutorial: a frozen MobileNetV2 base
    architectures.build("Transfer-learning tutorial").save(model_file)
    url, _ = server
    context, page = _upload_model(browser, url, model_file)
    page.get_by_text("Model: upload:").wait_for()
    _settle(page)
    _assert_clean(page)
    source = page.url.split("model=")[1].split("&")[0]
    assert source.startswith("upload")
    page.goto(f"{url}/attribution?model={source}&image=chelsea&target=class+0&methods=Grad-CAM&methods=Saliency")
    page.get_by_text("Why class 0?").wait_for()
    page.locator("[data-testid=stMain] img").nth(2).wait_for()  # the image and two overlays
    _settle(page)
    _assert_clean(page)
    page.get_by_text("Why class 0?").scroll_into_view_if_needed()
    _screenshot(page, "attribution_upload.png")
    page.goto(f"{url}/pruning?model={source}")
    page.get_by_role("button", name="Download the pruned model (.keras)").wait_for()
    _settle(page)
    _assert_clean(page)
    assert page.get_by_text("Top-1 agreement", exact=True).is_visible()
    assert page.get_by_text("Dependency groups", exact=True).is_visible()
    assert page.get_by_text("The masked model is offered instead").count() == 0  # a smaller base in the same head
    context.close()


def test_pruning_page_on_resnet50_shows_groups_what_if_and_a_smaller_model(server, browser):
    url, _ = server
    context, page = _open(browser, f"{url}/pruning?model=keras:ResNet50:untrained")
    page.get_by_role("button", name="Download the pruned model (.keras)").wait_for()
    _settle(page)
    _assert_clean(page)
    assert page.get_by_text("Dependency groups", exact=True).is_visible()
    assert page.get_by_text("Top-1 agreement", exact=True).is_visible()
    assert page.get_by_text("The masked model is offered instead").count() == 0  # a real cut, not a mask
    page.get_by_text("Dependency groups", exact=True).scroll_into_view_if_needed()
    _screenshot(page, "pruning_resnet50.png")
    context.close()


def test_cancel_stops_a_running_job_and_it_stays_stopped(server, browser):
    url, _ = server
    context, page = _open(browser, f"{url}/activations?model=demo:vgg16&images=shapes&count=600")
    page.get_by_role("button", name="Compute statistics").click()
    running = page.get_by_text(re.compile(r"Statistics over the image set: \d+ / 600"))
    running.wait_for()  # the bar has counted a batch
    page.get_by_role("button", name="Cancel").click()
    page.get_by_text("Statistics over the image set: cancelled").wait_for(timeout=30_000)
    page.wait_for_timeout(8000)  # a restarted job would show its bar again by now
    assert running.count() == 0
    assert page.get_by_text("Dead filters per layer").count() == 0
    assert "stats=1" not in page.url
    _assert_clean(page)
    context.close()


def test_a_running_job_stops_when_its_tab_is_closed(server, browser):
    url, log = server
    context, page = _open(browser, f"{url}/activations?model=demo:vgg16&images=shapes&count=500")
    page.get_by_role("button", name="Compute statistics").click()
    page.get_by_text(re.compile(r"Statistics over the image set: \d+ / 500")).wait_for()  # a batch is done
    context.close()
    stopped = re.compile(r"job 'Statistics over the image set' stopped at (\d+) / 500")
    deadline = time.time() + 60  # VGG16 on 500 images would take minutes here
    while time.time() < deadline and not stopped.search(log.read_text()):
        time.sleep(0.5)
    match = stopped.search(log.read_text())
    assert match, log.read_text()[-3000:]
    assert 0 < int(match.group(1)) < 500


def test_the_walk_left_no_warning_flood_in_the_server_log(server):
    """After every page above: no inotify overflow (the watcher walking .venv) and no warning repeated
    over and over (runs as the module's last test)."""
    from collections import Counter

    _, log = server
    text = log.read_text()
    assert "Inotify" not in text and "inotify" not in text
    warnings = Counter(re.sub(r"\d+", "N", line) for line in text.splitlines() if "WARNING" in line or "Warning" in line)
    assert not warnings or max(warnings.values()) < 20, warnings.most_common(3)
