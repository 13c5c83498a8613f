"""The labelling page in a real browser (headless Chromium through Selenium): rank with ties
by mouse and by keyboard, flag, submit, undo, skip, tie all, see the agreement; the server
killed between submissions loses nothing. Needs the `chromium` and `chromium-driver`
packages (`.ci/run` installs them): pytest -m browser tests/test_label_browser.py.

With RLHFKIT_SCREENSHOTS=DIR set, the page is saved at the main steps (the images in
docs/human-feedback.md)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from label_server import SAMPLE_ROWS, Server, new_session
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.browser

SHOTS = os.environ.get("RLHFKIT_SCREENSHOTS")


@pytest.fixture(scope="module")
def browser():
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.fail("the browser tests need Chromium and its driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                     "--force-device-scale-factor=1"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    yield driver
    driver.quit()


def shot(driver, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SHOTS) / f"label-{name}.png"))


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_text(driver, element_id: str, text: str, timeout: float = 10) -> None:
    WebDriverWait(driver, timeout).until(lambda d: text in d.find_element(By.ID, element_id).text)


def card(driver, letter: str):
    return driver.find_element(By.CSS_SELECTOR, f'.card[data-letter="{letter}"]')


def tier(driver, number: int | None):
    value = "" if number is None else str(number - 1)
    return driver.find_element(By.CSS_SELECTOR, f'.tier[data-tier="{value}"]')


def index_of(driver) -> dict[str, int]:
    """Letter shown on the page -> the completion's index in the item."""
    return {c.get_attribute("data-letter"): int(c.get_attribute("data-index"))
            for c in driver.find_elements(By.CSS_SELECTOR, ".card")}


def tiers_on_page(driver) -> dict[str, list[str]]:
    return {t.get_attribute("data-tier"): [c.get_attribute("data-letter") for c in t.find_elements(By.CSS_SELECTOR, ".card")]
            for t in driver.find_elements(By.CSS_SELECTOR, ".tier")}


def drag(driver, letter: str, number: int) -> None:
    ActionChains(driver).click_and_hold(card(driver, letter)).move_by_offset(12, 12) \
        .move_to_element(tier(driver, number)).release().perform()


def keys(driver, *pressed: str) -> None:
    chain = ActionChains(driver)
    for key in pressed:
        chain.send_keys(key)
    chain.perform()


def log_in(driver, url: str, name: str) -> None:
    driver.get(url + "/")
    driver.execute_script("localStorage.clear()")
    driver.get(url + "/")
    field = WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "name-input").is_displayed()
                                            and d.find_element(By.ID, "name-input"))
    shot(driver, "1-name")
    field.send_keys(name, Keys.ENTER)
    wait_text(driver, "progress-text", f"0 / {len(SAMPLE_ROWS)} done")


def test_rank_with_ties_by_mouse_and_by_keyboard_flag_submit_undo_skip(tmp_path, browser):
    session = new_session(tmp_path)
    rankings, unranked = session / "rankings.jsonl", session / "unranked.jsonl"
    with Server(session) as server:
        log_in(browser, server.url, "alice")
        assert browser.find_element(By.ID, "submit").get_attribute("disabled")  # nothing ranked yet

        # 1. by mouse: A and B tied best, C next (flagged off-topic by a click), D last
        first = index_of(browser)
        drag(browser, "A", 1)
        drag(browser, "B", 1)
        drag(browser, "C", 2)
        drag(browser, "D", 3)
        card(browser, "C").find_element(By.CSS_SELECTOR, '.flag[data-flag="off-topic"]').click()
        assert tiers_on_page(browser) == {"0": ["A", "B"], "1": ["C"], "2": ["D"], "3": [], "": []}
        shot(browser, "2-ranked-by-mouse")
        browser.find_element(By.ID, "submit").click()
        wait_text(browser, "progress-text", "1 / 12 done")
        (row,) = rows(rankings)
        expected = [0] * 4
        for letter, rank in {"A": 0, "B": 0, "C": 1, "D": 2}.items():
            expected[first[letter]] = rank
        assert row["ranks"] == expected and row["labeller"] == "alice"
        assert row["flags"][first["C"]] == ["off-topic"] and sum(map(len, row["flags"])) == 1

        # 2. keyboard only: the first response has focus; 1-9 place it and move to the next unranked
        second = index_of(browser)
        keys(browser, "2", "1", "2", "3", "h")  # A:2  B:1  C:2 (tied with A)  D:3, then flag D harmful
        assert tiers_on_page(browser)["0"] == ["B"] and tiers_on_page(browser)["1"] == ["A", "C"]
        shot(browser, "3-ranked-by-keyboard")
        keys(browser, Keys.ENTER)
        wait_text(browser, "progress-text", "2 / 12 done")
        row = rows(rankings)[1]
        assert [row["ranks"][second[x]] for x in "ABCD"] == [1, 0, 1, 2]
        assert row["flags"][second["D"]] == ["harmful"]

        # 3. undo: the last submission comes back as it was, and leaves the file
        keys(browser, "u")
        wait_text(browser, "progress-text", "1 / 12 done")
        assert tiers_on_page(browser)["0"] == ["B"] and tiers_on_page(browser)["1"] == ["A", "C"]
        assert len(rows(rankings)) == 1
        shot(browser, "4-after-undo")
        keys(browser, Keys.ARROW_DOWN, Keys.ARROW_DOWN, "1")  # focus C, put it with B: now B = C > A > D
        keys(browser, Keys.ENTER)
        wait_text(browser, "progress-text", "2 / 12 done")
        row = rows(rankings)[1]
        assert [row["ranks"][second[x]] for x in "ABCD"] == [1, 0, 0, 2]

        # 4. skip, then "all tied": both count as done, neither is a ranking row
        keys(browser, "s")
        wait_text(browser, "progress-text", "3 / 12 done (1 skipped)")
        keys(browser, "t", Keys.ENTER)
        wait_text(browser, "progress-text", "4 / 12 done (1 skipped)")
        assert [r["reason"] for r in rows(unranked)] == ["skip", "tied"]
        assert len(rows(rankings)) == 2

        # 5. the agreement view, with a second labeller ranking through the API
        client = server.client()
        while (item := client.next("bob")["item"]) is not None:
            client.submit("bob", item["id"], [[r["index"]] for r in item["responses"]])
        browser.get(server.url + "/agreement")
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pairs tbody tr"))
        cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#pairs tbody tr td")]
        assert cells[:2] == ["alice", "bob"]
        assert "Overall agreement" in browser.find_element(By.ID, "overall").text
        shot(browser, "5-agreement")


def test_the_server_killed_between_submissions_loses_nothing_and_the_page_goes_on(tmp_path, browser):
    session = new_session(tmp_path)
    server = Server(session).start()
    try:
        log_in(browser, server.url, "carol")
        keys(browser, "1", "2", "3", "4", Keys.ENTER)
        wait_text(browser, "progress-text", "1 / 12 done")
        server.kill()
        keys(browser, "4", "3", "2", "1", Keys.ENTER)  # the server is down: the page keeps the ranking
        wait_text(browser, "notice", "could not reach the labelling server")
        assert browser.find_element(By.ID, "progress-text").text.startswith("1 / 12")
        shot(browser, "6-server-down")
        server.start()  # same port, same session
        keys(browser, Keys.ENTER)
        wait_text(browser, "progress-text", "2 / 12 done")
        saved = rows(session / "rankings.jsonl")
        assert len(saved) == 2 and len({r["item"] for r in saved}) == 2
        assert sorted(saved[1]["ranks"]) == [0, 1, 2, 3]
        browser.refresh()  # a reload resumes at the next item, with the name remembered
        wait_text(browser, "progress-text", "2 / 12 done")
        time.sleep(0.2)
        assert browser.find_element(By.ID, "labeller-name").text == "carol"
    finally:
        server.kill()
