"""The labeling page in headless Chromium (Debian's, driven by Playwright).

The page runs as ``fedrlhf label`` in its own process on 127.0.0.1, so a test can
kill it like a crash would; it is stopped by PID after each test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from client.label_queue import QueueSettings, refresh_queue
from client.store import PreferenceStore
from common.processes import flower_bin, free_port, stop_process_tree, wait_until_listening

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = Path(__file__).resolve().parent.parent / "test-artifacts" / "labeling-page.png"
HOSTILE = "<script>document.title='pwned'</script><b>bold?</b> & <img src=x onerror=alert(1)>"


class PageServer:
    def __init__(self, store: Path, logs: Path) -> None:
        self.store, self.port, self.token = store, free_port(), "test-token-123"
        self.log = logs / f"label-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PageServer:
        self.process = subprocess.Popen(
            [flower_bin("fedrlhf"), "label", "--store", str(self.store)]
            + ["--port", str(self.port), "--token", self.token],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until_listening(self.process, "127.0.0.1", self.port, self.log)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process_tree(self.process)


def make_store(path: Path, prompts: dict[str, list[str]], double_fraction: float = 0.0) -> Path:
    with PreferenceStore(path) as store:
        for prompt, responses in prompts.items():
            store.add_candidates(prompt, responses)
        refresh_queue(store, None, QueueSettings(double_fraction=double_fraction, seed=1))
    return path


PROMPTS = {
    f"Question {k}: how should I approach task {k}?": [
        f"A careful, step-by-step answer to task {k}.",
        f"A short reply about task {k}.",
        f"An off-topic ramble number {k}.",
    ]
    for k in range(5)
}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert os.path.exists(CHROMIUM), "install Debian's chromium (scripts/test.sh does)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def server(tmp_path) -> Iterator[PageServer]:
    server = PageServer(make_store(tmp_path / "org.sqlite", PROMPTS), tmp_path).start()
    yield server
    server.stop()


def sign_in(browser: Browser, server: PageServer, name: str) -> Page:
    page = browser.new_context().new_page()
    page.goto(f"{server.url}/?token={server.token}")
    page.fill("#name", name)
    page.click("#signin")
    page.wait_for_selector("#choice-form")
    return page


def press(page: Page, key: str) -> None:
    """A keyboard shortcut, once the page's script has attached its key handler."""
    page.wait_for_selector("body[data-shortcuts=ready]", state="attached")
    page.keyboard.press(key)


def shown(page: Page) -> tuple[str, str, str]:
    return (
        page.text_content("#prompt") or "",
        page.text_content("#response-a") or "",
        page.text_content("#response-b") or "",
    )


def comparisons(store: Path) -> list[tuple[str, str, str, str]]:
    with PreferenceStore(store) as s:
        return [(c.prompt, c.chosen, c.rejected, c.annotator) for c in s.comparisons()]


def live_labels(store: Path) -> list[tuple[str, str]]:
    with PreferenceStore(store) as s:
        rows = s.query("SELECT annotator, choice FROM labels WHERE undone_at IS NULL ORDER BY id")
    return [(r["annotator"], r["choice"]) for r in rows]


def test_label_by_mouse_and_keyboard_with_tie_skip_and_undo(browser, server):
    page = sign_in(browser, server, "alice")
    assert "Signed in as alice" in (page.text_content("#who") or "")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    total = int(page.text_content("#remaining") or 0)
    assert total == 15  # 5 prompts x 3 pairs

    prompt, a, b = shown(page)
    page.click("#choose-a")  # mouse
    page.wait_for_selector("text=Recorded.")
    assert comparisons(server.store) == [(prompt, a, b, "alice")]
    assert page.text_content("#done") == "1" and page.text_content("#remaining") == str(total - 1)

    prompt2, a2, b2 = shown(page)
    press(page, "b")  # keyboard
    page.wait_for_selector("#done >> text=2")
    assert comparisons(server.store)[-1] == (prompt2, b2, a2, "alice")

    press(page, "t")
    page.wait_for_selector("text=Recorded a tie.")
    skipped = shown(page)
    page.click("#skip")
    page.wait_for_selector("text=Skipped.")
    assert [c for _, c in live_labels(server.store)][2:] == ["tie", "skip"]
    assert len(comparisons(server.store)) == 2  # ties and skips make no comparison

    press(page, "u")  # undo the skip: that pair comes back
    page.wait_for_selector("text=Last choice undone.")
    assert shown(page)[0] == skipped[0]
    assert [c for _, c in live_labels(server.store)][2:] == ["tie"]  # the skip is gone
    press(page, "u")
    page.wait_for_selector("#done >> text=2")
    page.click("#undo")  # undo the keyboard "B" choice: its comparison goes too
    page.wait_for_selector("#done >> text=1")
    assert comparisons(server.store) == [(prompt, a, b, "alice")]

    page.fill("#reason", "clearer steps")  # typing in the reason box is not a shortcut
    page.click("#choose-b")
    page.wait_for_selector("#done >> text=2")
    with PreferenceStore(server.store) as s:
        assert s.query("SELECT reason FROM labels ORDER BY id DESC LIMIT 1")[0][0] == (
            "clearer steps"
        )


def test_order_is_randomized_and_recorded(browser, server):
    page = sign_in(browser, server, "bob")
    for _ in range(8):
        page.click("#choose-a")
        page.wait_for_selector("text=Recorded.")
    with PreferenceStore(server.store) as s:
        rows = s.query(
            "SELECT l.choice, l.shown_left_id, lp.first_id FROM labels l"
            " JOIN label_pairs lp ON lp.id = l.pair_id"
        )
    # Always clicking the left response recorded "first" exactly when first was on the left.
    assert all((r["choice"] == "first") == (r["shown_left_id"] == r["first_id"]) for r in rows)
    assert len({r["choice"] for r in rows}) == 2  # both orders were shown


def test_requests_without_token_or_with_forged_forms_are_refused(browser, server):
    def status(url: str, data: bytes | None = None, headers: dict | None = None) -> int:
        request = urllib.request.Request(url, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(request) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status(f"{server.url}/") == 403  # no token, no session
    assert status(f"{server.url}/?token=wrong") == 403
    assert status(f"{server.url}/label", b"choice=left") == 403
    assert status(f"{server.url}/?token={server.token}", headers={"Host": "evil.test"}) == 403

    page = sign_in(browser, server, "carol")
    cookie = "; ".join(f"{c['name']}={c['value']}" for c in page.context.cookies())
    pair = page.get_attribute("input[name=pair]", "value")
    left = page.get_attribute("input[name=left]", "value")
    forged = f"pair={pair}&left={left}&choice=left".encode()
    with_cookie = {"Cookie": cookie}
    assert status(f"{server.url}/label", forged, with_cookie) == 403  # no CSRF token
    assert status(f"{server.url}/label", forged + b"&csrf=guess", with_cookie) == 403
    csrf = page.get_attribute("input[name=csrf]", "value")
    cross_site = {**with_cookie, "Origin": "http://evil.test"}
    assert status(f"{server.url}/label", forged + f"&csrf={csrf}".encode(), cross_site) == 403

    # A real cross-site form in the same browser: the SameSite cookie is not sent.
    evil = page.context.new_page()
    evil.set_content(
        f"<form id=f method=post action='{server.url}/label'>"
        f"<input name=pair value={pair}><input name=left value={left}>"
        "<input name=choice value=left></form>"
    )
    with evil.expect_navigation():
        evil.evaluate("document.getElementById('f').submit()")
    assert "Refused" in (evil.title() or "")
    assert live_labels(server.store) == [] and comparisons(server.store) == []


def test_html_in_a_response_shows_as_text(browser, tmp_path):
    store = make_store(tmp_path / "xss.sqlite", {"Is this <i>safe</i>?": [HOSTILE, "plain"]})
    server = PageServer(store, tmp_path).start()
    try:
        page = sign_in(browser, server, "<b>dave</b>")
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        texts = shown(page)
        assert texts[0] == "Is this <i>safe</i>?" and HOSTILE in texts[1:]
        assert "Signed in as <b>dave</b>" in (page.text_content("#who") or "")
        assert page.locator("article b, article img, article script, #prompt i").count() == 0
        assert page.title() != "pwned" and not dialogs
    finally:
        server.stop()


def test_killing_the_server_loses_no_submitted_choice(browser, server):
    page = sign_in(browser, server, "erin")
    submitted = []
    for key in ("a", "b", "a"):
        prompt, a, b = shown(page)
        press(page, key)
        page.wait_for_selector(f"#done >> text={len(submitted) + 1}")
        submitted.append((prompt, a if key == "a" else b, b if key == "a" else a, "erin"))
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    assert comparisons(server.store) == submitted
    server.start()  # the restarted page continues where the annotator was
    page = sign_in(browser, server, "erin")
    assert page.text_content("#done") == "3"
    assert page.text_content("#remaining") == "12"
