"""End to end in a real headless Chromium: upload an image, ask, read the streamed answer.

Needs Debian's ``chromium`` and ``chromium-driver`` (CI installs them); skipped otherwise. The
page screenshot is saved under ``$MONKEYTUNE_ARTIFACTS`` (or the test's temporary folder) and
its path printed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else shutil.which("chromedriver")
pytestmark = [
    # Looked up, not imported: every pytest worker collects this file, and gradio takes 4 s to import.
    pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("gradio", "selenium")),
                       reason="needs gradio and selenium (the serve and dev extras)"),
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="chromium and chromedriver are not installed (apt-get install chromium chromium-driver)",
    ),
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
]


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    # An explicit driver path keeps Selenium Manager from looking for drivers online.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _artifact_dir(tmp_path: Path) -> Path:
    root = os.environ.get("MONKEYTUNE_ARTIFACTS")
    directory = Path(root) if root else tmp_path
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def test_upload_ask_and_read_the_streamed_answer(server, browser, picture, tmp_path, answer):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    wait = WebDriverWait(browser, 30, poll_frequency=0.05)
    browser.get(url)

    def notice() -> str:
        return browser.find_element(By.ID, "notice").text

    # A file that is not an image: a message in the page, no crash.
    fake = tmp_path / "notes.png"
    fake.write_text("plain text, not a picture")
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#image-input input[type=file]")).send_keys(str(fake))
    wait.until(lambda d: "notes.png" in notice())
    assert "not a recognised image" in notice()

    # Replace it with a real picture: the tiling view appears.
    browser.find_element(By.CSS_SELECTOR, "#image-input button[aria-label='Remove Image']").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-input input[type=file]"))
    browser.find_element(By.CSS_SELECTOR, "#image-input input[type=file]").send_keys(str(picture))
    wait.until(lambda d: "scene.png" in notice() and "ready" in notice())
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#tiling img"))

    question = browser.find_element(By.CSS_SELECTOR, "#question textarea")
    question.send_keys("What is on the left?")
    browser.find_element(By.ID, "send").click()

    seen: list[str] = []

    def answered(driver) -> bool:
        bots = driver.find_elements(By.CSS_SELECTOR, "#chat .message.bot")
        text = bots[-1].text.strip() if bots else ""
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        return text == answer

    wait.until(answered)
    assert all(answer.startswith(s) for s in seen), seen
    users = [m.text for m in browser.find_elements(By.CSS_SELECTOR, "#chat .message.user")]
    assert any("What is on the left?" in u for u in users)
    assert browser.find_elements(By.CSS_SELECTOR, "#chat .message.user img"), "the image is shown in the chat"
    time.sleep(0.3)  # let the tiling image finish painting for the screenshot

    shot = _artifact_dir(tmp_path) / "serve-chat.png"
    browser.save_screenshot(str(shot))
    print(f"\nscreenshot: {shot}")
    assert shot.stat().st_size > 10_000
