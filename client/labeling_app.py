"""The labeling page: annotators compare two responses in a browser, on the premises.

A small threaded HTTP server from the standard library, bound to 127.0.0.1 unless
told otherwise. Access needs the token printed at start: opening ``/?token=...``
creates a session (an HttpOnly, SameSite=Strict cookie). Every form carries the
session's CSRF token and is refused without it, or from another origin. All text is
escaped; the page loads nothing from outside (its CSS and script are served here,
and the Content-Security-Policy forbids anything else). Each choice is committed to
the store before the reply is sent, so killing the server loses nothing submitted.
"""

from __future__ import annotations

import hmac
import html
import logging
import secrets
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from client.label_queue import (
    MAX_REASON_CHARS,
    LabelError,
    PairToLabel,
    Progress,
    next_pair,
    progress,
    record_label,
    undo_last,
)
from client.store import PreferenceStore

log = logging.getLogger(__name__)

COOKIE = "fedrlhf_session"
MAX_FORM_BYTES = 16_384
MAX_NAME_CHARS = 80
ASSETS = {"/static/app.css": "text/css", "/static/app.js": "text/javascript"}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: with no-referrer Chromium sends "Origin: null" on
    # our own form posts, and the Origin check below could not tell them from forgeries.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass
class Session:
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    annotator: str | None = None
    showing: tuple[int, int] | None = None
    """(pair id, id of the response shown on the left) of the page last served."""
    message: str = ""


class LabelingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, store: Path, host: str = "127.0.0.1", port: int = 0, token: str = ""):
        self.store_path = Path(store)
        with PreferenceStore(self.store_path):
            pass  # create or check the store before serving anything
        self.token = token or secrets.token_urlsafe(24)
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        super().__init__((host, port), LabelingHandler)

    @property
    def origin(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def sign_in_url(self) -> str:
        return f"{self.origin}/?token={self.token}"


def _asset(path: str) -> bytes:
    return files("client").joinpath("labeling_assets", path.rsplit("/", 1)[1]).read_bytes()


class LabelingHandler(BaseHTTPRequestHandler):
    server: LabelingServer
    server_version = "fedrlhf-label"
    sys_version = ""

    # -- plumbing -------------------------------------------------------------------

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("%s %s", self.address_string(), format % args)

    def _send(
        self, status: HTTPStatus, body: bytes, content_type: str, headers: dict | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _page(self, status: HTTPStatus, title: str, body: str, headers: dict | None = None) -> None:
        self._send(status, _layout(title, body).encode(), "text/html", headers)

    def _redirect(self, location: str = "/", headers: dict | None = None) -> None:
        self.send_response(HTTPStatus.SEE_OTHER)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        for name, value in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()

    def _refuse(self, status: HTTPStatus, why: str) -> None:
        log.warning("refused %s %s from %s: %s", self.command, self.path, self.client_address, why)
        self._page(status, "Refused", f"<p class='error'>{html.escape(why)}</p>")

    def _host_ok(self) -> bool:
        """Refuse other Host names (DNS rebinding would otherwise reach this page)."""
        host, port = self.server.server_address[:2]
        allowed = {f"{host}:{port}", f"localhost:{port}", f"127.0.0.1:{port}"}
        return self.headers.get("Host", "") in allowed

    def _session(self) -> tuple[str, Session] | None:
        cookie = SimpleCookie(self.headers.get("Cookie", ""))
        sid = cookie[COOKIE].value if COOKIE in cookie else ""
        with self.server.lock:
            session = self.server.sessions.get(sid)
        return (sid, session) if session else None

    def _form(self, session: Session) -> dict[str, str] | None:
        """The posted form, or None (after refusing) if it is too big, cross-site or forged."""
        origin = self.headers.get("Origin")
        if origin is not None and origin != self.server.origin and origin != _localhost(self):
            self._refuse(HTTPStatus.FORBIDDEN, "cross-site request refused")
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self._refuse(HTTPStatus.BAD_REQUEST, "bad Content-Length")
            return None
        if not 0 <= length <= MAX_FORM_BYTES:
            self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "form too large")
            return None
        raw = self.rfile.read(length).decode("utf-8", errors="replace")
        form = {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}
        if not hmac.compare_digest(form.get("csrf", ""), session.csrf):
            self._refuse(HTTPStatus.FORBIDDEN, "missing or wrong form token (CSRF) refused")
            return None
        return form

    # -- routes ---------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802
        if not self._host_ok():
            return self._refuse(HTTPStatus.FORBIDDEN, "unknown Host")
        url = urlsplit(self.path)
        if url.path == "/favicon.ico":
            return self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        if url.path in ASSETS:
            return self._send(HTTPStatus.OK, _asset(url.path), ASSETS[url.path])
        token = parse_qs(url.query).get("token", [""])[0]
        if token:
            if not hmac.compare_digest(token, self.server.token):
                return self._refuse(HTTPStatus.FORBIDDEN, "wrong token")
            sid = secrets.token_urlsafe(32)
            with self.server.lock:
                self.server.sessions[sid] = Session()
            cookie = f"{COOKIE}={sid}; HttpOnly; SameSite=Strict; Path=/"
            return self._redirect("/", {"Set-Cookie": cookie})
        found = self._session()
        if found is None:
            return self._refuse(
                HTTPStatus.FORBIDDEN, "open the link with the token printed when the page started"
            )
        if url.path != "/":
            return self._refuse(HTTPStatus.NOT_FOUND, "no such page")
        _, session = found
        if session.annotator is None:
            return self._page(HTTPStatus.OK, "Sign in", _sign_in(session))
        with PreferenceStore(self.server.store_path) as store:
            pair = next_pair(store, session.annotator)
            stats = progress(store, session.annotator)
        left_first = secrets.randbelow(2) == 0
        session.showing = (
            None
            if pair is None
            else (pair.pair_id, pair.first_id if left_first else pair.second_id)
        )
        message, session.message = session.message, ""
        self._page(HTTPStatus.OK, "Compare", _compare(session, pair, left_first, stats, message))

    def do_POST(self) -> None:  # noqa: N802
        if not self._host_ok():
            return self._refuse(HTTPStatus.FORBIDDEN, "unknown Host")
        found = self._session()
        if found is None:
            return self._refuse(HTTPStatus.FORBIDDEN, "no session: open the link with the token")
        sid, session = found
        form = self._form(session)
        if form is None:
            return None
        path = urlsplit(self.path).path
        if path == "/signin":
            name = " ".join(form.get("name", "").split())
            if not name or len(name) > MAX_NAME_CHARS:
                session.message = f"Enter a name (1 to {MAX_NAME_CHARS} characters)."
            else:
                session.annotator = name
            return self._redirect()
        if path == "/signout":
            with self.server.lock:
                self.server.sessions.pop(sid, None)
            return self._redirect("/", {"Set-Cookie": f"{COOKIE}=; Max-Age=0; Path=/"})
        if session.annotator is None:
            return self._refuse(HTTPStatus.FORBIDDEN, "sign in first")
        if path == "/label":
            return self._label(session, form)
        if path == "/undo":
            with PreferenceStore(self.server.store_path) as store:
                pair_id = undo_last(store, session.annotator)
            session.message = "Nothing to undo." if pair_id is None else "Last choice undone."
            return self._redirect()
        return self._refuse(HTTPStatus.NOT_FOUND, "no such action")

    def _label(self, session: Session, form: dict[str, str]) -> None:
        try:
            shown = (int(form.get("pair", "")), int(form.get("left", "")))
        except ValueError:
            return self._refuse(HTTPStatus.BAD_REQUEST, "fields 'pair' and 'left' must be numbers")
        if shown != session.showing:
            session.message = "That pair was no longer on your page; here is the current one."
            return self._redirect()
        try:
            with PreferenceStore(self.server.store_path) as store:
                record_label(
                    store,
                    session.annotator or "",
                    shown[0],
                    shown[1],
                    form.get("choice", ""),
                    form.get("reason", "").strip(),
                )
        except LabelError as exc:
            return self._refuse(HTTPStatus.BAD_REQUEST, str(exc))
        session.showing = None
        session.message = {"skip": "Skipped.", "tie": "Recorded a tie."}.get(
            form.get("choice", ""), "Recorded."
        )
        return self._redirect()


def _localhost(handler: LabelingHandler) -> str:
    return f"http://localhost:{handler.server.server_address[1]}"


# -- HTML ----------------------------------------------------------------------------


def _layout(title: str, body: str) -> str:
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)} · fedrlhf labeling</title>"
        "<link rel='stylesheet' href='/static/app.css'>"
        "<script src='/static/app.js' defer></script></head>"
        f"<body><header><h1>fedrlhf labeling</h1></header><main>{body}</main></body></html>"
    )


def _csrf(session: Session) -> str:
    return f"<input type='hidden' name='csrf' value='{html.escape(session.csrf)}'>"


def _sign_in(session: Session) -> str:
    message = html.escape(session.message)
    session.message = ""
    return (
        f"<p class='message'>{message}</p>"
        "<form method='post' action='/signin' class='signin'>"
        f"{_csrf(session)}<label>Your name <input name='name' id='name' autofocus "
        f"maxlength='{MAX_NAME_CHARS}' required></label>"
        "<button type='submit' id='signin'>Start labeling</button></form>"
    )


def _compare(
    session: Session, pair: PairToLabel | None, left_first: bool, stats: Progress, message: str
) -> str:
    who = html.escape(session.annotator or "")
    agreement = "–" if stats.agreement is None else f"{stats.agreement:.0%}"
    bar = (
        f"<nav><span id='who'>Signed in as <b>{who}</b></span>"
        f"<span id='progress'>Done today: <b id='done'>{stats.done_today}</b> · "
        f"Remaining: <b id='remaining'>{stats.remaining}</b> · "
        f"Agreement on double-labeled pairs: <b id='agreement'>{agreement}</b> "
        f"({stats.double_labeled_pairs} pairs)</span>"
        "<form method='post' action='/undo'>"
        f"{_csrf(session)}<button id='undo' type='submit' title='u'>Undo last (u)</button></form>"
        "<form method='post' action='/signout'>"
        f"{_csrf(session)}<button type='submit'>Sign out</button></form></nav>"
        f"<p class='message' id='message'>{html.escape(message)}</p>"
    )
    if pair is None:
        return bar + "<p id='empty'>The queue is empty: nothing left to label. Thank you!</p>"
    left, right = (pair.first, pair.second) if left_first else (pair.second, pair.first)
    left_id = pair.first_id if left_first else pair.second_id
    return (
        bar + f"<section class='prompt'><h2>Prompt</h2><p id='prompt'>{html.escape(pair.prompt)}"
        "</p></section><form method='post' action='/label' id='choice-form'>"
        f"{_csrf(session)}<input type='hidden' name='pair' value='{pair.pair_id}'>"
        f"<input type='hidden' name='left' value='{left_id}'>"
        "<div class='responses'>"
        f"<article><h2>A</h2><p id='response-a'>{html.escape(left)}</p>"
        "<button name='choice' value='left' id='choose-a'>A is better (a)</button></article>"
        f"<article><h2>B</h2><p id='response-b'>{html.escape(right)}</p>"
        "<button name='choice' value='right' id='choose-b'>B is better (b)</button></article>"
        "</div><div class='others'>"
        "<button name='choice' value='tie' id='tie'>Tie (t)</button>"
        "<button name='choice' value='skip' id='skip'>Skip (s)</button>"
        f"<label>Reason (optional) <input name='reason' id='reason' "
        f"maxlength='{MAX_REASON_CHARS}'></label></div></form>"
    )
