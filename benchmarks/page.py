#!/usr/bin/env python3
"""The page of --serve, timed in a real browser as a user meets it: start the server with a trained model, open
the page in Debian's headless Chromium, drop a photo and time its answer, then teach a folder of class folders
(zipped, as the page takes a folder) and time it, and save a screenshot of each view.

    python3 benchmarks/page.py models/fashion_cnn.keras --photo docs/examples/ankle_boot.jpg \\
        --teach ../shared/data/real-clothes-dev --screenshots docs

Prints the answer as the page shows it and as --predict prints it, the seconds from the drop to the answer, the
held-out figure of teaching as the page shows it and the seconds it took, and what --predict says with the model
downloaded from the page. Needs requirements-dev.txt (Gradio, Selenium) and Debian's chromium and
chromium-driver. The tests drive the browser through chromium() too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parent.parent / "ConvolutionalNN.py"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1600")  # without the background-networking flags it calls Google's hosts


def chromium(profile: Path) -> Any:
    """Debian's headless Chromium under Selenium, with its network requests logged (goog:loggingPrefs)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)


def free_port() -> int:
    """A port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, plots: Path, workdir: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """python3 ConvolutionalNN.py --serve as a user starts it; the process and the page's address."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(workdir)}  # the server's uploads land in workdir
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--serve", "--port", str(port), "--model-path", str(model),
                             "--plots-dir", str(plots), *extra], cwd=workdir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline()
    if not line.startswith("Serving the page on"):
        proc.kill()
        sys.exit(f"error: the server did not start: {line}{proc.stderr.read()}")
    return proc, f"http://127.0.0.1:{port}/"


def wait_for(condition: Callable[[], Any], seconds: float = 120, every: float = 0.05) -> Any:
    """condition()'s first true value, within seconds."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"not within {seconds} s")


def text_of(driver: Any, selector: str) -> str:
    """The text of the first element the CSS selector finds ('' if none)."""
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return found[0].text if found else ""


def upload(driver: Any, selector: str, *paths: Path) -> None:
    """Files into the upload component at selector, as a user picks them."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f"{selector} input[type=file]").send_keys("\n".join(map(str, paths)))


def open_tab(driver: Any, name: str) -> None:
    """Click the page's tab called name."""
    from selenium.webdriver.common.by import By

    next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == name).click()


def requested_elsewhere(driver: Any, page: str) -> list[str]:
    """The network addresses (http, https, ws, wss) the browser asked for that are not the server's own; the
    browser's own pages (chrome://) are not the network."""
    messages = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    urls = [m["params"]["request"]["url"] for m in messages if m["method"] == "Network.requestWillBeSent"]
    own = (page, page.replace("http", "ws", 1))
    return [url for url in urls if url.startswith(("http:", "https:", "ws:", "wss:")) and not url.startswith(own)]


def zipped(folder: Path, into: Path) -> Path:
    """folder as a .zip, its class folders inside."""
    archive = into / f"{folder.name}.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(folder.parent))
    return archive


def main() -> int:
    """Serve, classify, teach, print the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--photo", type=Path, default=SCRIPT.parent / "docs" / "examples" / "ankle_boot.jpg")
    p.add_argument("--teach", type=Path, help="a folder with a folder of photos per class")
    p.add_argument("--screenshots", type=Path, help="save page_classify.png and page_teach.png here")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="page_benchmark_") as work:
        work = Path(work)
        model = work / "models" / a.model.name
        model.parent.mkdir()
        shutil.copy(a.model, model)  # taught models land beside it, not beside the user's
        started = time.perf_counter()
        proc, page = start_server(model, work / "plots", work)
        print(f"server up in {time.perf_counter() - started:.1f} s at {page}", flush=True)
        driver = chromium(work / "profile")
        try:
            driver.get(page)
            wait_for(lambda: text_of(driver, "button[role=tab]"))
            upload(driver, "#drop", a.photo)
            dropped = time.perf_counter()
            answer = wait_for(lambda: a.photo.name in text_of(driver, "#answers") and text_of(driver, "#answers"))
            print(f"first answer {time.perf_counter() - dropped:.2f} s after the drop: {answer}")
            wait_for(lambda: driver.execute_script(  # the picture of what the network saw, loaded
                "const img = document.querySelector('#seen img'); return img && img.complete && img.naturalWidth"))
            if a.screenshots:
                driver.save_screenshot(str(a.screenshots / "page_classify.png"))
            if a.teach:
                open_tab(driver, "Teach")
                upload(driver, "#zip", zipped(a.teach, work))
                time.sleep(2)  # the upload lands
                name = driver.find_element("css selector", "#name textarea, #name input")
                name.clear()
                name.send_keys(a.teach.name)
                taught = time.perf_counter()
                driver.find_element("css selector", "#teach").click()
                summary = wait_for(lambda: "Held-out photos" in text_of(driver, "#taught") and text_of(
                    driver, "#taught"), 900, 0.5)
                print(f"taught in {time.perf_counter() - taught:.0f} s: {summary.splitlines()[0]}")
                link = wait_for(lambda: driver.find_elements("css selector", "#download a[href]"))[0]
                urllib.request.urlretrieve(link.get_attribute("href"), work / "downloaded.keras")  # as the browser does
                wait_for(lambda: len(driver.find_elements("css selector", "img")) >= 3)
                if a.screenshots:
                    driver.execute_script("arguments[0].scrollIntoView()", driver.find_element("css selector", "#zip"))
                    time.sleep(1)
                    driver.save_screenshot(str(a.screenshots / "page_teach.png"))
            print(f"requests elsewhere than the server: {requested_elsewhere(driver, page) or 'none'}")
        finally:
            driver.quit()
            proc.send_signal(signal.SIGINT)  # Ctrl-C: the server stops and removes the uploads
            proc.wait(timeout=60)
        printed = subprocess.run([sys.executable, str(SCRIPT), "--predict", str(a.photo), "--model-path", str(model),
                                  "--plots-dir", str(work / "plots")], capture_output=True, text=True, check=False)
        print(f"--predict prints: {printed.stdout.splitlines()[0] if printed.stdout else printed.stderr}")
        if a.teach:
            printed = subprocess.run([sys.executable, str(SCRIPT), "--predict", str(a.photo), "--model-path",
                                      str(work / "downloaded.keras"), "--plots-dir", str(work / "plots")],
                                     capture_output=True, text=True, check=False)
            print(f"--predict with the downloaded model: {printed.stdout.splitlines()[0] if printed.stdout else printed.stderr}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
