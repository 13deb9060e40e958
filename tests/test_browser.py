"""The web page in a real headless Chromium (Debian's, driven by Selenium), against a real
`chatbot serve` process with its embedded Redis, under the service's Content-Security-Policy and
Origin check; and the terminal client against the same process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from chatbot.testing import free_port



@dataclass(frozen=True)
class Server:
    url: str
    log: Path

    def redis(self):
        """A client of the server's embedded Redis (its socket path is in the server's log)."""
        import redis

        line = next(line for line in self.log.read_text().splitlines() if "embedded Redis on " in line)
        return redis.Redis(unix_socket_path=line.split("embedded Redis on ")[1].split(",")[0])


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    data = tmp_path_factory.mktemp("serve-data")
    # A file, not a pipe: nobody reads the server's output while it runs, and a full pipe would block it.
    log_path = data / "serve.log"
    with log_path.open("wb") as log_file:  # the child keeps its own handle
        proc = subprocess.Popen(
            [sys.executable, "-m", "chatbot.cli", "serve", "--port", str(port), "--model", str(tiny_model_dir),
             "--data-dir", str(data), "--num-candidates", "2", "--max-new-tokens", "8", "--shutdown-grace", "5"],
            stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "REDIS_URL": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # imports, model, embedder and knowledge base, embedded Redis: a
        while time.monotonic() < deadline:  # few seconds on a quiet box, a minute or more on a loaded one
            if proc.poll() is not None:
                pytest.fail(f"chatbot serve exited early:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("chatbot serve never became ready")
        yield Server(url, log_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    # A graceful stop: exit status 0 and the embedded Redis wrote its data.
    assert code == 0, log_path.read_text()
    assert any((data / "redis").iterdir())


def test_page_streams_a_reply_and_resumes_after_reload(server: Server, browser) -> None:
    """Under the page's own CSP (which forbids inline script): the page still works."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with urllib.request.urlopen(server.url + "/", timeout=10) as resp:
        csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp

    wait = WebDriverWait(browser, 60)
    browser.get(server.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
    assert browser.find_element(By.ID, "status").text == "new conversation"

    box = browser.find_element(By.ID, "input")
    box.send_keys("hello, who are you?")
    browser.find_element(By.ID, "send").click()
    bot = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '.turn.bot[data-state="done"]'))
    # The reply arrived in streamed pieces before the final frame, and shows its (empty) sources.
    assert int(bot.get_attribute("data-pieces") or 0) >= 1
    reply_text = bot.find_element(By.CLASS_NAME, "text").text
    assert reply_text.strip()
    assert "sources: none" in bot.text
    assert browser.find_element(By.CSS_SELECTOR, ".turn.user").text == "hello, who are you?"

    # A reload resumes the same conversation from Redis.
    browser.refresh()
    wait.until(lambda d: d.find_element(By.ID, "status").text == "resumed conversation")
    turns = [(el.get_attribute("class").split()[-1], el.find_element(By.CLASS_NAME, "text").text)
             for el in browser.find_elements(By.CSS_SELECTOR, ".turn")]
    assert turns == [("user", "hello, who are you?"), ("bot", reply_text)]

    # Nothing the page does was blocked by the policy ...
    refused = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert refused == []
    # ... and the policy is in force: an inline script injected into the page does not run.
    ran = browser.execute_script("const s = document.createElement('script');"
                                 "s.textContent = 'window.inlineRan = true;';"
                                 "document.head.appendChild(s); return window.inlineRan === true;")
    assert ran is False
    assert any("Content Security Policy" in e["message"] for e in browser.get_log("browser"))


def test_page_shows_the_source_of_a_reply_about_a_known_topic(server: Server, browser) -> None:
    """`chatbot serve` uses the shipped Wikipedia knowledge base by default: a question about a topic in it
    gets a reply whose sources, listed under it on the page, link to that topic's article."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(server.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
    before = len(browser.find_elements(By.CSS_SELECTOR, '.turn.bot[data-state="done"]'))
    browser.find_element(By.ID, "input").send_keys("Who painted the Mona Lisa?")
    browser.find_element(By.ID, "send").click()
    bot = wait.until(lambda d: (lambda done: len(done) > before and done[-1])(
        d.find_elements(By.CSS_SELECTOR, '.turn.bot[data-state="done"]')))
    links = bot.find_elements(By.CSS_SELECTOR, "ol.sources a")
    assert links, bot.text
    assert links[0].text == "Mona Lisa"
    assert links[0].get_attribute("href").startswith("https://") and "Mona_Lisa" in links[0].get_attribute("href")
    assert links[0].get_attribute("rel") == "noopener noreferrer"


def test_page_starts_a_new_session_when_its_session_expired(server: Server, browser) -> None:
    """The session's keys expire while the page is open: the next message starts a new session, the
    page says so, and the message is sent again there instead of being lost."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(server.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
    browser.find_element(By.ID, "input").send_keys("first message")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '.turn.bot[data-state="done"]'))
    old = browser.execute_script("return localStorage.getItem('chatbot.session_id')")

    client = server.redis()
    try:
        assert client.delete(*[f"chat:{{{old}}}:{k}" for k in ("meta", "turns", "ids")]) == 3  # what the TTL does
    finally:
        client.close()

    browser.find_element(By.ID, "input").send_keys("are you still there?")
    browser.find_element(By.ID, "send").click()

    def settled(d):
        turns = d.find_elements(By.CSS_SELECTOR, ".turn")
        return len(turns) == 2 and turns[1].get_attribute("data-state") in ("done", "error") and turns

    user, bot = wait.until(settled)
    assert bot.get_attribute("data-state") == "done" and bot.find_element(By.CLASS_NAME, "text").text.strip()
    assert user.text == "are you still there?"
    assert "expired" in browser.find_element(By.CLASS_NAME, "notice").text
    assert "expired" in browser.find_element(By.ID, "status").text
    new = browser.execute_script("return localStorage.getItem('chatbot.session_id')")
    assert new and new != old


def test_terminal_client_chats_and_resumes(server: Server) -> None:
    cmd = [sys.executable, "-m", "chatbot.cli", "client", server.url]
    first = subprocess.run(cmd, input="hi there\nwho painted the Mona Lisa?\n", capture_output=True, text=True,
                           timeout=60)
    assert first.returncode == 0, first.stderr
    replies = first.stdout.splitlines()
    assert len(replies) == 2  # piped: one reply line per message line; sources go to stderr
    assert "https://en.wikipedia.org/wiki/Mona_Lisa" in first.stderr
    session_id = first.stderr.split("--session ")[1].split(")")[0]
    again = subprocess.run([*cmd, "--session", session_id], input="me again\n", capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0 and len(again.stdout.splitlines()) == 1, again.stderr
    unknown = subprocess.run([*cmd, "--session", "0" * 40], input="hello?\n", capture_output=True, text=True,
                             timeout=60)
    assert unknown.returncode == 2 and "unknown_session" in unknown.stderr
