"""The web chat page in a real headless browser: Debian's Chromium driven by Selenium types a
message, sees the reply stream in, and regenerates it.

Skipped where no Chromium is installed (`apt install chromium chromium-driver`); CI installs it
(.ci/run). Selenium is pointed at the installed driver and told to stay offline, so it never
downloads a browser or driver.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import httpx
import pytest
import torch
from helpers_run import make_run, shared_tokenizer

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tformer_cli.inference.chat import chat_mode  # noqa: E402
from tformer_cli.inference.load import load_for_inference  # noqa: E402
from tformer_cli.serve.app import create_app  # noqa: E402
from tformer_cli.serve.prompts import ServedModel, ServeSettings  # noqa: E402
from tformer_cli.serve.server import ServerThread  # noqa: E402

BROWSERS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
DRIVERS = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
KEY = "sk-page"
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def _found(candidates: tuple[str, ...], name: str) -> str | None:
    return next((p for p in candidates if os.access(p, os.X_OK)), None) or shutil.which(name)


BROWSER, DRIVER = _found(BROWSERS, "chromium"), _found(DRIVERS, "chromedriver")
pytestmark = pytest.mark.skipif(
    not (BROWSER and DRIVER), reason="no Chromium found: apt install chromium chromium-driver"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_run(
        tmp_path_factory.mktemp("serve-page") / "page",
        shared_tokenizer(500),
        seed=5,
        chat=True,
        tie_embeddings=False,
    )
    run = load_for_inference(path, torch.device("cpu"), "fp32")
    model = ServedModel("page", run, chat_mode(run.info, run.tokenizer))
    with ServerThread(create_app([model], ServeSettings(api_key=KEY))) as s:
        yield s


@pytest.fixture
def browser(monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    profile = tempfile.mkdtemp(prefix="tformer-chromium-")
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _type(driver, element_id: str, text: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(text)


def _reply(driver, wait: WebDriverWait, n: int):
    """The n-th assistant message, once it has finished streaming."""
    done = ".msg.assistant[data-done='true']"
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) >= n)
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[n - 1]


def test_the_page_streams_a_reply_and_regenerates_it(server, browser):
    wait = WebDriverWait(browser, 60)
    browser.get(server.url + "/")
    _type(browser, "api_key", KEY + "\n")  # the page asks the API for its models with the key
    browser.find_element(By.ID, "system").send_keys("Be brief.")
    browser.execute_script("document.getElementById('api_key').dispatchEvent(new Event('change'))")
    wait.until(lambda d: d.find_element(By.ID, "model").get_attribute("data-loaded") == "true")
    assert browser.find_element(By.ID, "model").get_attribute("value") == "page"
    _type(browser, "temperature", "0")
    _type(browser, "max_tokens", "30")
    _type(browser, "prompt", "Hello there")
    browser.find_element(By.ID, "send").click()
    first = _reply(browser, wait, 1)
    text = first.find_element(By.CLASS_NAME, "content").get_property("textContent")
    assert int(first.get_attribute("data-chunks")) > 1  # it came in pieces, as they decoded
    assert first.get_attribute("data-finish") in ("stop", "length")
    assert "tokens" in browser.find_element(By.ID, "status").text
    # the same conversation through the API: the page sent what a client would
    body = {
        "model": "page",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"},
        ],
        "temperature": 0,
        "max_tokens": 30,
        "top_p": 0.95,
        "repetition_penalty": 1.1,
    }
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    expected = r.json()["choices"][0]["message"]["content"]
    assert text == expected and text
    browser.find_element(By.ID, "regenerate").click()
    again = _reply(browser, wait, 1)  # the reply is replaced by a new one
    wait.until(lambda d: again.get_attribute("data-done") == "true")
    assert again.find_element(By.CLASS_NAME, "content").get_property("textContent") == text
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 1
