"""--serve in a real browser: Debian's headless Chromium, driven by Selenium through chromium-driver, as a user
uses the page: drop a photo and read its class, teach two classes of drawn pictures and read the held-out
accuracy, drop a broken file and go on; nothing the page loads comes from anywhere but the server; Ctrl-C stops
the server and removes the uploads. Screenshots of both views land in the test's folder (and in
$PAGE_SCREENSHOTS, if set)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import page
from conftest import SCRIPT, class_image, run_cli
from test_finetune import FOLDERS, draw_photos

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, trained: dict) -> Iterator[dict]:
    """python3 ConvolutionalNN.py --serve over a copy of the trained model, as a user starts it."""
    work = tmp_path_factory.mktemp("served")
    base = work / "models" / "fashion_cnn.keras"
    base.parent.mkdir()
    shutil.copy(trained["model"], base)
    proc, url = page.start_server(base, work / "plots", work, "--epochs", "10")
    yield {"url": url, "proc": proc, "work": work, "base": base}
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def browser(server: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    driver = page.chromium(tmp_path_factory.mktemp("chromium"))
    driver.get(server["url"])
    page.wait_for(lambda: page.text_of(driver, "button[role=tab]"))
    yield driver
    driver.quit()


def screenshot(driver: object, folder: Path, name: str) -> None:
    driver.save_screenshot(str(folder / name))
    if os.environ.get("PAGE_SCREENSHOTS"):
        driver.save_screenshot(str(Path(os.environ["PAGE_SCREENSHOTS"]) / name))


def start_teaching(driver: object, teach: Path, name: str) -> None:
    """On the Teach tab, name two classes of FOLDERS, drop their photos from teach into them, name the model and
    press Teach."""
    from selenium.webdriver.common.by import By

    page.open_tab(driver, "Teach")
    fields = [(f"#class-{number}", label) for number, label in enumerate(list(FOLDERS)[:2], start=1)]
    for selector, text in [*fields, ("#name", name)]:
        field = driver.find_element(By.CSS_SELECTOR, f"{selector} textarea, {selector} input")
        field.clear()
        field.send_keys(text)
    for number, label in enumerate(list(FOLDERS)[:2], start=1):
        page.upload(driver, f"#photos-{number}", *sorted((teach / label).iterdir()))
    time.sleep(1)  # the uploads land
    driver.find_element(By.CSS_SELECTOR, "#teach").click()


def test_a_dropped_photo_gets_the_class_and_probability_predict_prints(browser: object, server: dict,
                                                                      tmp_path: Path) -> None:
    photo = tmp_path / "boot.png"
    Image.fromarray(class_image(9, seed=3)).resize((140, 140)).save(photo)
    printed = run_cli("--predict", photo, "--json", "--model-path", server["base"], "--plots-dir", tmp_path)
    expected = json.loads(printed.stdout)[0]
    page.open_tab(browser, "Classify")
    page.upload(browser, "#drop", photo)
    answer = page.wait_for(lambda: "boot.png" in page.text_of(browser, "#answers") and page.text_of(browser, "#answers"))
    assert f"boot.png: {expected['class']} {expected['probability']:.1%}" in answer
    page.wait_for(lambda: page.text_of(browser, "#seen"))
    screenshot(browser, tmp_path, "page_classify.png")


def test_a_broken_file_is_a_message_and_the_page_goes_on(browser: object, server: dict, tmp_path: Path) -> None:
    page.open_tab(browser, "Classify")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    page.upload(browser, "#drop", tmp_path / "broken.jpg")
    assert "could not read" in page.wait_for(lambda: "broken.jpg" in page.text_of(browser, "#answers")
                                        and page.text_of(browser, "#answers"))
    assert server["proc"].poll() is None, "the server goes on serving"


def test_teaching_two_classes_of_drawn_pictures_shows_the_held_out_accuracy(browser: object, server: dict,
                                                                           tmp_path: Path) -> None:
    start_teaching(browser, draw_photos(tmp_path / "teach"), "my-photos")
    summary = page.wait_for(lambda: "Held-out photos" in page.text_of(browser, "#taught") and page.text_of(browser, "#taught"), 300)
    metrics = json.loads((server["work"] / "plots" / "finetune-my-photos" / "metrics.json").read_text())
    assert f"right class: {metrics['held_out_accuracy']:.1%}" in summary
    assert (server["base"].with_name("fashion_cnn_my-photos.keras")).exists()
    screenshot(browser, tmp_path, "page_teach.png")


def test_a_second_tab_classifies_while_the_first_teaches(browser: object, server: dict, tmp_path: Path) -> None:
    teaching_tab = browser.current_window_handle
    start_teaching(browser, draw_photos(tmp_path / "teach", count=60), "two-tabs")  # several seconds of teaching
    photo = tmp_path / "bag.png"
    Image.fromarray(class_image(8, seed=4)).resize((140, 140)).save(photo)
    browser.switch_to.new_window("tab")
    try:
        browser.get(server["url"])
        page.wait_for(lambda: page.text_of(browser, "button[role=tab]"))
        page.open_tab(browser, "Classify")
        page.upload(browser, "#drop", photo)
        page.wait_for(lambda: "bag.png" in page.text_of(browser, "#answers"), 60)
        answered = time.time()
    finally:
        browser.close()
        browser.switch_to.window(teaching_tab)
    page.wait_for(lambda: "two-tabs" in page.text_of(browser, "#taught"), 300)
    taught = server["base"].with_name("fashion_cnn_two-tabs.keras")
    assert taught.stat().st_mtime > answered, "the second tab's answer came while the first tab was still teaching"


def test_nothing_the_page_loads_comes_from_anywhere_but_the_server(browser: object, server: dict) -> None:
    assert page.requested_elsewhere(browser, server["url"]) == []


def test_the_page_serves_no_file_of_the_machine(server: dict) -> None:
    import urllib.error
    import urllib.request

    for path in ("/etc/passwd", str(SCRIPT), str(server["base"])):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{server['url']}gradio_api/file={path}", timeout=10)
        assert refused.value.code in (403, 404), path


def test_ctrl_c_stops_the_server_and_removes_the_uploads(server: dict, browser: object) -> None:
    proc = server["proc"]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Stopped; the uploaded photos were removed." in out
    assert not list(server["work"].glob("fashion_cnn_page_*")), "the server's folder of uploads is gone"
