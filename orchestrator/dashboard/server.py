"""Serving the dashboard: the token file, the listening socket, uvicorn on a daemon thread.

The token is made once per run directory (``DIR/dashboard.token``, mode 0600) and kept across
orchestrator restarts, so a page left open keeps working. ``DIR/dashboard.json`` says where the
server listens (no secret in it). The server answers only the Host names it is known by
(:func:`served_hosts`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import structlog

from workers.output import write_json_atomic

log = structlog.get_logger(__name__)

TOKEN_FILE = "dashboard.token"
INFO_FILE = "dashboard.json"


def ensure_token(out_dir: str | os.PathLike) -> str:
    """The run's dashboard token, created (mode 0600, written whole then renamed) if absent."""
    path = Path(out_dir) / TOKEN_FILE
    with contextlib.suppress(FileNotFoundError):
        token = path.read_text().strip()
        if token:
            os.chmod(path, 0o600)
            return token
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token


def advertised_name(host: str) -> str:
    """The name a server bound to ``host`` is reached by: this node's address when bound to all of them."""
    if host not in ("0.0.0.0", "::"):
        return host
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else socket.gethostname()


def served_hosts(host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """Host names answered by a server bound to ``host`` (no others: DNS rebinding): loopback, its own, ``extra``."""
    from orchestrator.dashboard.app import normalise_hosts

    return normalise_hosts([advertised_name(host), *extra])


def _bind(host: str, port: int) -> tuple[socket.socket, bool]:
    """A listening socket on (host, port), or on a free port when that one is taken. Returns (socket, moved)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for p, moved in ((port, False), (0, True)):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, p))
        except OSError:
            sock.close()
            if p == 0:
                raise
            continue
        sock.listen(128)
        return sock, moved and port != 0
    raise AssertionError("unreachable")


class DashboardServer:
    """uvicorn serving ``app`` on a daemon thread of this process."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock, moved = _bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        if moved:
            log.warning("dashboard.port_taken", requested=port, port=self.port)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._serve, name="dashboard", daemon=True)

    def _serve(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except Exception:  # noqa: BLE001 - the run goes on without its dashboard
            log.exception("dashboard.crashed")

    @property
    def url(self) -> str:
        host = advertised_name(self.host)
        return f"http://[{host}]:{self.port}/" if ":" in host else f"http://{host}:{self.port}/"

    def start(self, timeout: float = 10.0) -> DashboardServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError("the dashboard server did not start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


def start_dashboard(orch, host: str, port: int) -> DashboardServer:
    """Serve the dashboard of the Orchestrator ``orch``; record where in DIR/dashboard.json."""
    from orchestrator.dashboard.app import create_app
    from orchestrator.dashboard.views import OrchestratorView

    out_dir = orch.run.out_dir
    token = ensure_token(out_dir)
    allowed = served_hosts(host, getattr(orch.run, "dashboard_allow_hosts", None) or [])
    app = create_app(OrchestratorView(orch), token, allowed_hosts=allowed)
    server = DashboardServer(app, host, port).start()
    log.info("dashboard.hosts", allowed=sorted(allowed))
    write_json_atomic(
        Path(out_dir) / INFO_FILE,
        {"url": server.url, "host": host, "port": server.port, "pid": os.getpid(), "token_file": TOKEN_FILE},
    )
    return server
