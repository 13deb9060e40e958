"""The rating page in a real headless Chromium (Debian's, driven by Selenium) against a real
`chatbot eval rate` process: a rater signs in, rates two items with the keyboard and undoes one, and
responses holding <script> and <img onerror> show as text and run nothing."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatbot.testing import free_port
from eval.itemset import Item, RatingSet, system_info
from eval.rating_client import RatingClient
from tests.test_ssa_durability import wait_ready

HOSTILE = ('<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'
           '<b onmouseover="window.__xss = 3">bold?</b>')


@pytest.fixture
def form(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    items = [Item(f"item{k}", "bot", (f"turn {k} {HOSTILE}",), f"reply {k} {HOSTILE}") for k in range(3)]
    set_path = RatingSet("hostile", "transcripts", items, {"bot": system_info("imported")}).save(tmp_path / "set.json")
    data, port = tmp_path / "data", free_port()
    log_path = tmp_path / "rate.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "chatbot.cli", "eval", "rate", "--set", str(set_path),
                                 "--port", str(port), "--data-dir", str(data)], stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log_path)

        async def new_rater() -> str:
            async with RatingClient(url) as boss:
                await boss.sign_in((data / "admin-token").read_text().strip())
                return (await boss.create_rater("ann"))["token"]

        yield url, asyncio.run(new_rater()), data / "ratings.sqlite"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, log_path.read_text()


def test_rater_rates_with_the_keyboard_undoes_and_hostile_text_stays_text(form, browser) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, token, db_path = form
    wait = WebDriverWait(browser, 30)
    browser.get(url + "/")
    box = wait.until(lambda d: d.find_element(By.ID, "token") if d.find_element(By.ID, "signin").is_displayed() else None)
    box.send_keys(token + Keys.ENTER)
    rating = wait.until(lambda d: d.find_element(By.ID, "rating") if d.find_element(By.ID, "rating").is_displayed() else None)

    def shown_item(previous: str | None = None) -> str:
        return wait.until(lambda d: (rating.get_attribute("data-item-id") or None)
                          if rating.get_attribute("data-item-id") != previous and rating.is_displayed() else None)

    def progress() -> str:
        return browser.find_element(By.ID, "progress-text").text

    def assert_inert() -> None:
        response = browser.find_element(By.ID, "response").text
        context = browser.find_element(By.ID, "context").text
        assert "<script>window.__xss = 1</script>" in response and '<img src=x onerror="window.__xss = 2">' in response
        assert "<script>" in context and "onmouseover" in context
        assert browser.find_elements(By.CSS_SELECTOR, "main img, main b, #response script, #context script") == []
        assert browser.execute_script("return window.__xss === undefined")

    keys = ActionChains(browser)
    first = shown_item()
    assert progress() == "0 / 3 rated"
    assert_inert()
    keys.send_keys("y").perform()  # sensible...
    wait.until(lambda d: d.find_element(By.ID, "q-specific").is_displayed())
    keys.send_keys("n").perform()  # ...but not specific
    second = shown_item(first)
    wait.until(lambda d: progress() == "1 / 3 rated")
    assert_inert()
    keys.send_keys("n").perform()  # not sensible
    third = shown_item(second)
    wait.until(lambda d: progress() == "2 / 3 rated")
    keys.send_keys("u").perform()  # undo the last answer: the second item is back
    assert shown_item(third) == second
    wait.until(lambda d: progress() == "1 / 3 rated")
    assert_inert()

    conn = sqlite3.connect(db_path)
    answers = conn.execute("SELECT item_id, sensible, specific FROM answers").fetchall()
    conn.close()
    assert answers == [(first, 1, 0)]
    # The guide with the definitions is one click away.
    browser.find_element(By.CSS_SELECTOR, "#guide summary").click()
    assert "Roger Federer" in browser.find_element(By.ID, "guide").text


def test_admin_page_creates_a_rater_and_shows_progress(form, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, db_path = form
    admin_token = (db_path.parent / "admin-token").read_text().strip()
    wait = WebDriverWait(browser, 30)
    browser.get(url + "/admin")
    box = wait.until(lambda d: d.find_element(By.ID, "token") if d.find_element(By.ID, "signin").is_displayed() else None)
    box.send_keys(admin_token + Keys.ENTER)
    wait.until(lambda d: d.find_element(By.ID, "admin").is_displayed()
               and "bot" in d.find_element(By.ID, "systems").text)
    assert "hostile" in browser.find_element(By.ID, "sets").text
    name = browser.find_element(By.ID, "rater-name")
    name.send_keys('<img src=x onerror="window.__xss = 4">' + Keys.ENTER)
    token_line = wait.until(lambda d: d.find_element(By.ID, "new-token").text or None)
    assert token_line.startswith("Rater r") and "token (shown only now): r" in token_line
    wait.until(lambda d: '<img src=x onerror="window.__xss = 4">' in d.find_element(By.ID, "raters").text)
    assert browser.find_elements(By.CSS_SELECTOR, "main img") == []
    assert browser.execute_script("return window.__xss === undefined")
