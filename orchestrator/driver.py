"""Driving a run from the command line: connect to Ray, start/attach the Orchestrator, show progress."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path

import ray
import structlog
from ray.exceptions import GetTimeoutError, RayActorError
from tqdm import tqdm

from orchestrator.actor import start_orchestrator
from orchestrator.cli_common import UsageError
from orchestrator.registry import NAMESPACE, RunSpec, request_stop
from orchestrator.run_lock import Heartbeat, RunLocked, acquire, new_token, release
from workers.config import ModelConfig
from workers.messages import RunProgress

log = structlog.get_logger(__name__)

ORCHESTRATOR_GONE_S = 180.0  # how long the driver waits for a restarting orchestrator


class RunLock:
    """The driver's hold on DIR/run.lock, from before anything is written until the command ends.

    The Orchestrator adopts the same token and heartbeats it too, so the lock stays fresh while either
    lives (a detached orchestrator outlives a killed driver). A live directory is refused: UsageError.
    """

    def __init__(self, out_dir: str):
        self.out_dir, self.token, self.lost = out_dir, new_token(), None
        try:
            acquire(out_dir, self.token, "driver")
        except RunLocked as e:
            raise UsageError(f"{e}; watch it with `longroll status --out {out_dir}`") from None
        self._beat = Heartbeat(out_dir, self.token, on_lost=self._on_lost).start()

    def _on_lost(self, why: str) -> None:
        self.lost = why

    def release(self) -> None:
        self._beat.stop()
        with contextlib.suppress(OSError):
            release(self.out_dir, self.token)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the run like Ctrl-C: every stream checkpointed, nothing half-written


def connect(address: str | None, run: RunSpec, verbose: bool = False) -> None:
    """Join the Ray cluster at ``address``, or start an embedded local one sized for the run."""
    env = {"env_vars": {k: v for k, v in os.environ.items() if k.startswith("LONGROLL_")}}
    if address:
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=verbose, runtime_env=env)
        except ConnectionError as e:
            if os.environ.get("RAY_AUTH_MODE") == "token" or "AuthToken" not in repr(e.__cause__):
                raise
            # the cluster uses token authentication (Ray 2.60's default for `ray start`): retry with
            # the token from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token
            log.info("ray.token_auth", address=address)
            from ray._private.authentication.authentication_token_setup import _enable_token_auth

            _enable_token_auth()
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=verbose, runtime_env=env)
    else:
        # every rank of a generator group reserves worker_cpus: fewer logical CPUs and groups never start
        cpus = max(os.cpu_count() or 1, math.ceil(run.workers * run.group_size * run.worker_cpus))
        ray.init(
            address="local",
            num_cpus=cpus,
            namespace=NAMESPACE,
            include_dashboard=False,
            log_to_driver=verbose,
            runtime_env=env,
        )


def dashboard_line(out_dir: str, url: str) -> str:
    """The line that announces the dashboard; its URL carries the token after '#' (never sent to the server)."""
    from orchestrator.dashboard.server import TOKEN_FILE

    try:
        token = (Path(out_dir) / TOKEN_FILE).read_text().strip()
    except OSError:
        return f"dashboard: {url} (pause/resume/stop need the token in {Path(out_dir) / TOKEN_FILE})"
    return f"dashboard: {url}#token={token} (token also in {Path(out_dir) / TOKEN_FILE}, mode 0600)"


def _get_progress(orch) -> RunProgress | None:
    try:
        return ray.get(orch.progress.remote(), timeout=30)
    except (RayActorError, GetTimeoutError):
        return None  # restarting: Ray re-runs its constructor, which rebuilds the run from DIR


def drive(run: RunSpec, lock: RunLock, quiet: bool = False) -> int:
    """Run the Orchestrator of ``run.out_dir`` to the end with a live progress display. Returns the exit code:
    0 done or stopped, 1 failed (one `error:` line) or interrupted."""
    with contextlib.suppress(ValueError):  # only the main thread may install handlers
        signal.signal(signal.SIGTERM, _terminate)
    orch = start_orchestrator(run.out_dir, lock_token=lock.token)
    targets = [e.target_chunks for e in run.streams]
    total = None if any(t is None for t in targets) else sum(targets)
    bar = tqdm(total=total, unit="chunk", desc="longroll", disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)
    t0, last_seen, p = time.monotonic(), time.monotonic(), None
    shown_url = None
    try:
        while True:
            q = _get_progress(orch)
            if q is None:
                if time.monotonic() - last_seen > ORCHESTRATOR_GONE_S:
                    raise RuntimeError("the orchestrator did not come back")
                time.sleep(1.0)
                continue
            p, last_seen = q, time.monotonic()
            if p.dashboard_url and p.dashboard_url != shown_url:
                shown_url = p.dashboard_url
                tqdm.write(dashboard_line(run.out_dir, shown_url), file=sys.stdout)
            done = sum(s.next_chunk for s in p.streams)
            bar.n = done
            states = [s.state for s in p.streams]
            bar.set_postfix(
                running=states.count("running"),
                done=states.count("done"),
                workers=len(p.workers),
                fps=f"{p.frames / max(time.time() - p.started_at, 1e-9):.1f}",
                refresh=False,
            )
            bar.refresh()
            if p.state in ("done", "stopped", "failed"):
                break
            if lock.lost is not None:
                raise RuntimeError(lock.lost)
            time.sleep(0.5)
    except KeyboardInterrupt:
        bar.close()
        print("stopping: checkpointing every stream...", file=sys.stderr)
        request_stop(run.out_dir, None)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            q = _get_progress(orch)
            if q is not None and q.state in ("done", "stopped", "failed"):
                break
            time.sleep(0.5)
        ray.kill(orch, no_restart=True)
        print(f"error: interrupted; continue with `longroll resume --out {run.out_dir}`", file=sys.stderr)
        return 1
    bar.close()
    ray.kill(orch, no_restart=True)
    if p.state == "failed":
        print(
            f"error: {p.fatal or 'the run failed'} (continue with `longroll resume --out {run.out_dir}`)",
            file=sys.stderr,
        )
        return 1
    elapsed = time.monotonic() - t0
    frames = p.frames
    cfg = ModelConfig.from_dict(run.model)
    layout = cfg.cache_layout()
    decodes = cfg.can_decode or bool((run.model_source or {}).get("vae"))
    unit = "frames" if decodes else "latent frames"  # streams without a decoder write latents
    print(
        f"{p.state}: {len(p.streams)} streams, {sum(s.next_chunk for s in p.streams)} chunks, "
        f"{frames} {unit} generated in {elapsed:.1f} s ({frames / max(elapsed, 1e-9):.1f} {unit}/s), "
        f"{len(p.recoveries)} recoveries; cache {layout.bytes_per_token()} bytes/token; output in {run.out_dir}"
    )
    return 0
