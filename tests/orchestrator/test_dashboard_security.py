"""The dashboard's HTTP hardening: Host names (DNS rebinding), security headers, the request body limit.

Most tests talk to a real uvicorn server (DashboardServer on 127.0.0.1, port 0) over a fake view of
one stream, so that Host headers, Content-Length and chunked bodies go over a real socket; the rest
use FastAPI's TestClient where the socket does not matter.
"""

import http.client
import json
import re
import socket
import struct
import threading
import zlib
from importlib import resources
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient

from orchestrator.dashboard import server as dash_server
from orchestrator.dashboard.app import CSP, MAX_BODY_BYTES, create_app, host_name
from orchestrator.dashboard.server import DashboardServer, served_hosts, start_dashboard

TOKEN = "test-token"
EXTRA = "Dash.Example"  # an extra Host name, as --dashboard-allow-host would give it


def _png_1x1() -> bytes:
    """A valid one-pixel PNG, so a browser shows the preview (made here: no torch import for one image)."""

    def part(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0\xff\x80\0")  # one row: filter 0, one RGB pixel
    return b"\x89PNG\r\n\x1a\n" + part(b"IHDR", ihdr) + part(b"IDAT", pixels) + part(b"IEND", b"")


PNG = _png_1x1()
WANT_HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


class FakeView:
    """One stream, s0, with one preview; counts what the routes asked, to show refused requests never got there."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.lock = threading.Lock()
        self.acted = threading.Event()

    def _note(self, *call) -> None:
        """Record a call (from the server's threads)."""
        with self.lock:
            self.calls.append(call)

    def has(self, sid: str) -> bool:
        return sid in ("s0", "boom")

    def _summary(self) -> dict:
        return {
            "id": "s0",
            "state": "running",
            "next_chunk": 3,
            "target_chunks": 10,
            "frames": 12,
            "worker_id": "w0",
            "fps": 1.5,
            "step_ms": 10.0,
            "retrieval_ms": None,
            "cache_bytes": 1024,
            "memory_rows": 3,
            "last_checkpoint": None,
            "checkpoint_age_s": None,
            "preview_chunk": 2,
        }

    def run(self) -> dict:
        self._note("run")
        return {
            "out_dir": "/tmp/run",
            "state": "running",
            "streams": 1,
            "running": 1,
            "paused": 0,
            "workers": [],
            "chunks": 3,
            "frames": 12,
            "fps": 1.5,
            "recoveries": 0,
            "error": None,
        }

    def streams(self) -> list[dict]:
        self._note("streams")
        return [self._summary()]

    def stream(self, sid: str) -> dict | None:
        self._note("stream", sid)
        if sid == "boom":
            raise RuntimeError("a view that fails: FastAPI answers 500")
        if not self.has(sid):
            return None
        return {**self._summary(), "seed": 1, "prompt": "", "history": [], "checkpoints": [], "log": []}

    def preview(self, sid: str, chunk: int | None) -> tuple[int, bytes] | None:
        self._note("preview", sid, chunk)
        return (2, PNG) if chunk in (None, 2) else None

    def control(self, sid: str, action: str, reason: str | None) -> str:
        self._note("control", sid, action, reason)
        self.acted.set()
        return "paused"

    def controls(self) -> list[tuple]:
        with self.lock:
            return [c for c in self.calls if c[0] == "control"]


def auth() -> dict:
    """The right bearer token: refusals below must not be the token check's."""
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def live():
    """A real server on 127.0.0.1 answering the loopback names and EXTRA."""
    view = FakeView()
    app = create_app(view, TOKEN, allowed_hosts=served_hosts("127.0.0.1", [EXTRA]))
    server = DashboardServer(app, "127.0.0.1", 0).start()
    client = httpx.Client(base_url=server.url, timeout=30)
    yield SimpleNamespace(server=server, view=view, client=client, port=server.port)
    client.close()
    server.stop()


def raw_request(port: int, head: str, *parts: bytes) -> tuple[socket.socket, http.client.HTTPResponse]:
    """Send ``head`` and ``parts`` over a fresh socket and read the answer, keeping the request unfinished."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)  # waits on the answer, at most 30 s
    sock.sendall(head.encode("latin-1"))
    for part in parts:
        sock.sendall(part)
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return sock, resp


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body, written by hand so the body can be left unfinished."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


# ---- Host names ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, name",
    [
        ("127.0.0.1:8470", "127.0.0.1"),
        ("LocalHost", "localhost"),
        ("[::1]:8470", "::1"),
        ("[::1]", "::1"),
        ("Dash.Example:80", "dash.example"),
        ("::1", ""),  # IPv6 without brackets is no Host
        ("[::1", ""),
        ("[::1]x", ""),
        ("localhost:port", ""),
        ("localhost:1:2", ""),
        ("", ""),
    ],
)
def test_host_name_is_the_name_part_lower_case(value, name):
    assert host_name(value) == name


def test_a_wrong_host_is_400_before_any_route_runs(live):
    before = list(live.view.calls)
    for path in ("/api/run", "/api/streams", "/", "/streams/s0", "/api/streams/s0/preview", "/openapi.json"):
        for host in ("evil.example", f"evil.example:{live.port}", f"127.0.0.1.evil.example:{live.port}", "0.0.0.0"):
            r = live.client.get(path, headers={"Host": host})
            assert r.status_code == 400, (path, host, r.status_code)
            assert r.headers["content-type"] == "application/json" and "Host" in r.json()["detail"], r.text
    r = live.client.post("/api/streams/s0/pause", headers={**auth(), "Host": "evil.example"}, json={"reason": "x"})
    assert r.status_code == 400
    assert live.view.calls == before, "a refused request reached the view"


def test_the_served_host_names_are_answered(live):
    for host in (
        f"127.0.0.1:{live.port}",
        f"localhost:{live.port}",
        f"LOCALHOST:{live.port}",
        f"[::1]:{live.port}",
        "127.0.0.1",
        f"dash.example:{live.port}",
        "DASH.EXAMPLE",
    ):
        r = live.client.get("/api/run", headers={"Host": host})
        assert r.status_code == 200 and r.json()["streams"] == 1, (host, r.status_code, r.text)
        assert live.client.get("/", headers={"Host": host}).status_code == 200, host


def test_without_allowed_hosts_only_the_loopback_names_are_served():
    client = TestClient(create_app(FakeView(), TOKEN), base_url="http://127.0.0.1")
    for host, status in (("localhost:1", 200), ("[::1]", 200), ("127.0.0.1", 200), ("dash.example", 400)):
        assert client.get("/api/run", headers={"Host": host}).status_code == status, host
    assert client.get("/api/run", headers={"Host": "testserver"}).status_code == 400


def test_a_server_bound_to_all_addresses_answers_this_nodes_name(monkeypatch, live):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(dash_server.socket, "gethostname", lambda: "Node-7")
    for wildcard in ("0.0.0.0", "::"):
        names = served_hosts(wildcard, ["A.Example", "[fd00::5]"])
        assert names == {"127.0.0.1", "localhost", "::1", "node-7", "a.example", "fd00::5"}, names
    assert served_hosts("10.1.2.3") == {"127.0.0.1", "localhost", "::1", "10.1.2.3"}
    # the name the server prints is one it answers
    monkeypatch.setattr(live.server, "host", "0.0.0.0")
    assert live.server.url == f"http://Node-7:{live.port}/"
    assert host_name(httpx.URL(live.server.url).netloc.decode()) in served_hosts("0.0.0.0")


@pytest.mark.parametrize("has_field", [True, False])
def test_start_dashboard_serves_the_runs_extra_host_names(tmp_path, has_field):
    run = SimpleNamespace(out_dir=str(tmp_path))
    if has_field:
        run.dashboard_allow_hosts = [EXTRA, "other.example"]
    server = start_dashboard(SimpleNamespace(run=run), "127.0.0.1", 0)
    try:
        info = json.loads((tmp_path / "dashboard.json").read_text())
        with httpx.Client(base_url=info["url"], timeout=30) as c:
            assert c.get("/").status_code == 200  # Host 127.0.0.1:PORT
            assert c.get("/", headers={"Host": f"localhost:{server.port}"}).status_code == 200
            want = 200 if has_field else 400
            assert c.get("/", headers={"Host": f"dash.example:{server.port}"}).status_code == want
            assert c.get("/", headers={"Host": "OTHER.example"}).status_code == want
            assert c.get("/", headers={"Host": "third.example"}).status_code == 400
    finally:
        server.stop()


# ---- security headers ---------------------------------------------------------------------------
def assert_security_headers(r: httpx.Response) -> None:
    """Each header, with its exact value."""
    for name, value in WANT_HEADERS.items():
        assert r.headers.get(name) == value, (r.request.url, r.status_code, name, r.headers.get(name))


def test_every_answer_carries_the_security_headers(live):
    c = live.client
    answers = {
        "page": c.get("/"),
        "stream page": c.get("/streams/s0"),
        "unknown stream page": c.get("/streams/nope"),
        "script": c.get("/assets/dashboard.js"),
        "style": c.get("/assets/dashboard.css"),
        "json": c.get("/api/run"),
        "schema": c.get("/openapi.json"),
        "preview": c.get("/api/streams/s0/preview"),
        "api 404": c.get("/api/streams/nope"),
        "route 404": c.get("/no/such/route"),
        "422": c.get("/api/streams/s0/preview/abc"),
        "401": c.post("/api/streams/s0/pause"),
        "405": c.delete("/api/run", headers=auth()),
        "400 host": c.get("/", headers={"Host": "evil.example"}),
        "413": c.post("/api/streams/s0/pause", headers=auth(), content=b"x" * (MAX_BODY_BYTES + 1)),
    }
    want_status = {"unknown stream page": 404, "api 404": 404, "route 404": 404, "422": 422, "401": 401}
    want_status |= {"405": 405, "400 host": 400, "413": 413}
    for what, r in answers.items():
        assert r.status_code == want_status.get(what, 200), (what, r.status_code)
        assert_security_headers(r)
    assert answers["preview"].content == PNG and answers["preview"].headers["content-type"] == "image/png"


def test_a_500_carries_the_security_headers_too():
    client = TestClient(create_app(FakeView(), TOKEN), base_url="http://127.0.0.1", raise_server_exceptions=False)
    r = client.get("/api/streams/boom")
    assert r.status_code == 500
    assert_security_headers(r)


def test_the_csp_is_strict_and_the_pages_need_nothing_it_forbids():
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives == {
        "default-src": "'self'",
        "img-src": "'self'",
        "script-src": "'self'",
        "style-src": "'self'",
        "frame-ancestors": "'none'",
        "base-uri": "'none'",
        "form-action": "'self'",
        "object-src": "'none'",
    }
    static = resources.files("orchestrator.dashboard").joinpath("static")
    for page in ("index.html", "stream.html"):
        html = static.joinpath(page).read_text()
        assert "<style" not in html and not re.search(r"\sstyle\s*=", html), page  # no inline style
        assert not re.search(r"\son[a-z]+\s*=", html), page  # no inline event handlers
        scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
        assert scripts and all(re.fullmatch(r'\s*src="/assets/[a-z]+\.js"\s*', a) and not b.strip() for a, b in scripts)
        for url in re.findall(r'(?:src|href)="([^"]*)"', html):
            assert url.startswith("/") and not url.startswith("//"), (page, url)  # this origin only
    js = static.joinpath("dashboard.js").read_text()
    for banned in ("innerHTML", "eval(", "new Function", 'setAttribute("style"', "data:", "blob:", "http://"):
        assert banned not in js, banned


def test_the_pages_render_and_act_under_the_csp_in_chromium(live):
    from playwright.sync_api import expect, sync_playwright

    from tests.orchestrator.test_dashboard_browser import chromium

    exe = chromium()  # skips without Chromium
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            console: list[str] = []
            page.on("console", lambda m: console.append(m.text))
            page.add_init_script(
                "window.__csp = []; document.addEventListener('securitypolicyviolation',"
                " (e) => window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`));"
            )
            page.goto(f"{live.server.url}#token={TOKEN}")
            expect(page.locator("#token-state")).to_have_text("set")  # the script ran
            row = page.locator("#row-s0")
            expect(row.locator(".state")).to_have_text("running")  # fetched the API, built the row
            page.wait_for_function(
                "() => { const i = document.querySelector('#row-s0 img.preview');"
                " return i && i.complete && i.naturalWidth > 0; }"
            )
            # the progress bar's width, set from script (3 of 10 chunks), is not blocked by style-src
            assert row.locator(".bar > i").evaluate("e => getComputedStyle(e).width") != "0px"
            assert row.locator(".bar > i").evaluate("e => e.style.width") == "30%"
            assert page.locator("header").evaluate("e => getComputedStyle(e).display") == "flex"  # the stylesheet
            live.view.acted.clear()
            row.locator("button[data-action=pause]").click()
            assert live.view.acted.wait(30), "the Pause button's POST did not reach the view"
            assert live.view.controls()[-1] == ("control", "s0", "pause", "dashboard")

            page.goto(f"{live.server.url}streams/s0")
            expect(page.locator("#stream-state")).to_have_text("running")
            # a function, not an expression string: Playwright evaluates strings with eval, which the CSP forbids
            page.wait_for_function("() => document.getElementById('preview').naturalWidth > 0")
            expect(page.locator("#facts")).to_contain_text("seed")
            assert page.evaluate("window.__csp") == []
        finally:
            browser.close()
    assert not [m for m in console if "Content Security Policy" in m], console


# ---- the request body limit ---------------------------------------------------------------------
def test_a_1mb_authenticated_post_is_413_and_the_server_still_answers(live):
    before = len(live.view.controls())
    r = live.client.post("/api/streams/s0/pause", headers=auth(), content=b"{" + b" " * (1 << 20))
    assert r.status_code == 413 and "65536" in r.json()["detail"]
    assert len(live.view.controls()) == before, "an over-long body reached the route"
    assert live.client.get("/api/run").status_code == 200  # the same connection pool, still served
    with httpx.Client(base_url=live.server.url, timeout=30) as fresh:
        assert fresh.get("/api/streams/s0").json()["id"] == "s0"
        r = fresh.post("/api/streams/s0/pause", headers=auth(), json={"reason": "small"})
        assert r.status_code == 200 and r.json()["state"] == "paused"


def test_a_declared_400mb_body_is_refused_on_its_headers(live):
    head = (
        f"POST /api/streams/s0/pause HTTP/1.1\r\nHost: 127.0.0.1:{live.port}\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {400 << 20}\r\n\r\n"
    )
    sock, resp = raw_request(live.port, head, b'{"reason": "')  # the answer comes with the body barely begun
    try:
        assert resp.status == 413 and "detail" in json.loads(resp.read())
        assert resp.getheader("x-content-type-options") == "nosniff"
    finally:
        sock.close()


def test_a_chunked_body_growing_past_the_limit_is_413_while_it_is_sent(live):
    before = len(live.view.controls())
    head = (
        f"POST /api/streams/s0/pause HTTP/1.1\r\nHost: 127.0.0.1:{live.port}\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    parts = [chunk(b'{"reason": "')] + [chunk(b"x" * 8192) for _ in range(MAX_BODY_BYTES // 8192 + 1)]
    sock, resp = raw_request(live.port, head, *parts)  # no last chunk: the body never ends
    try:
        assert resp.status == 413 and "65536" in json.loads(resp.read())["detail"]
    finally:
        sock.close()
    assert len(live.view.controls()) == before
    assert live.client.get("/api/run").status_code == 200


def test_a_chunked_body_under_the_limit_is_served(live):
    head = (
        f"POST /api/streams/s0/pause HTTP/1.1\r\nHost: 127.0.0.1:{live.port}\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    sock, resp = raw_request(live.port, head, chunk(b'{"reason": '), chunk(b'"chunked"}'), b"0\r\n\r\n")
    try:
        assert resp.status == 200 and json.loads(resp.read())["state"] == "paused"
    finally:
        sock.close()
    assert live.view.controls()[-1] == ("control", "s0", "pause", "chunked")


def test_a_streamed_1mb_body_from_httpx_is_413(live):
    def body():
        yield b'{"reason": "'
        for _ in range(128):
            yield b"x" * 8192

    r = live.client.post(
        "/api/streams/s0/pause", headers={**auth(), "Content-Type": "application/json"}, content=body()
    )
    assert r.status_code == 413 and r.request.headers.get("transfer-encoding") == "chunked"
    assert live.client.get("/api/run").status_code == 200


def test_the_limit_is_64_kib_exactly():
    view = FakeView()
    client = TestClient(create_app(view, TOKEN), base_url="http://127.0.0.1")
    body = b'{"reason": "at the limit"}'
    at_limit = body + b" " * (MAX_BODY_BYTES - len(body))  # trailing blanks: still valid JSON
    headers = {**auth(), "Content-Type": "application/json"}
    r = client.post("/api/streams/s0/pause", headers=headers, content=at_limit)
    assert r.status_code == 200 and view.controls() == [("control", "s0", "pause", "at the limit")]
    r = client.post("/api/streams/s0/pause", headers=headers, content=at_limit + b" ")
    assert r.status_code == 413 and len(view.controls()) == 1
    assert MAX_BODY_BYTES == 64 * 1024
