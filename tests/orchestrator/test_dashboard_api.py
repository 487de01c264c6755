"""The dashboard's JSON API and metrics, against a real run on a real Ray (tiny model, in this process's cluster).

One run serves the whole module, its tests in order: s0 is paused first (and stays paused while the
others run), then reads, bad input and Prometheus metrics, then s0 is resumed, the endless s2 is
stopped and the run finishes. Pausing must stop the stream's chunk count; resuming must continue it
with exactly the frames of an uninterrupted rollout (s1 has the same seed, and both are compared with
an in-process rollout through the lossless mp4 segments).
"""

import json
import os
import socket
import stat
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import ray

from orchestrator.actor import start_orchestrator
from orchestrator.registry import RunSpec, StreamEntry
from tests.orchestrator.test_recovery import TINY, UPSCALE, check_outputs
from workers.types import StreamSpec

pytestmark = pytest.mark.slow
CHUNKS = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    metrics_port = _free_port()
    ray.init(
        address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port
    )
    out = tmp_path_factory.mktemp("dash") / "run"
    streams = [StreamEntry(StreamSpec(f"s{i}", seed=5), CHUNKS) for i in range(2)]  # same seed: same frames
    streams.append(StreamEntry(StreamSpec("s2", seed=6), None))  # endless, until the last test stops it
    spec = RunSpec(
        out_dir=str(out.resolve()),
        model=TINY.to_dict(),
        streams=streams,
        workers=1,
        checkpoint_every=4,
        segment_chunks=2,
        upscale=UPSCALE,
        dashboard_port=0,
    )
    spec.save()
    orch = start_orchestrator(spec.out_dir)
    deadline = time.monotonic() + 120
    while not (out / "dashboard.json").exists():
        assert time.monotonic() < deadline, "the dashboard did not start"
        time.sleep(0.2)
    info = json.loads((out / "dashboard.json").read_text())
    client = httpx.Client(base_url=info["url"], timeout=60)
    token = (out / "dashboard.token").read_text().strip()
    yield {
        "spec": spec,
        "orch": orch,
        "client": client,
        "token": token,
        "out": out,
        "metrics_port": metrics_port,
        "url": info["url"],
    }
    client.close()
    ray.kill(orch, no_restart=True)
    ray.shutdown()


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def wait_streams(client, pred, timeout=180, what="condition") -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        streams = {s["id"]: s for s in client.get("/api/streams").json()}
        if pred(streams):
            return streams
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: {streams}")


def test_pause_stops_the_chunk_count(live):
    c, token, spec = live["client"], live["token"], live["spec"]
    wait_streams(c, lambda s: s["s0"]["next_chunk"] >= 3, what="s0 at chunk 3")
    r = c.post("/api/streams/s0/pause", headers=auth(token), json={"reason": "test"})
    assert r.status_code == 200 and r.json() == {"id": "s0", "action": "pause", "state": "paused"}
    paused_at = c.get("/api/streams/s0").json()
    assert paused_at["state"] == "paused" and paused_at["worker_id"] is None and paused_at["fps"] == 0
    assert paused_at["last_checkpoint"] == paused_at["next_chunk"]  # released with a checkpoint where it stood
    assert json.loads((spec.stream_dir("s0") / "manifest.json").read_text())["state"] == "paused"
    before = wait_streams(c, lambda s: True)
    time.sleep(2.0)
    after = wait_streams(c, lambda s: True)
    assert after["s0"]["next_chunk"] == paused_at["next_chunk"] and after["s0"]["state"] == "paused"
    assert after["s2"]["next_chunk"] > before["s2"]["next_chunk"], "the other streams must go on"
    assert c.post("/api/streams/s0/pause", headers=auth(token)).json()["state"] == "paused"  # harmless repeat
    log = c.get("/api/streams/s0").json()["log"]
    assert [e["event"] for e in log if e["event"].startswith(("request.", "stream.paused"))] == [
        "request.pause",
        "stream.paused",
    ]


def test_reads_list_streams_detail_previews_and_schema(live):
    c = live["client"]
    streams = wait_streams(c, lambda s: all(v["preview_chunk"] is not None for v in s.values()), what="previews")
    assert sorted(streams) == ["s0", "s1", "s2"]
    s2 = streams["s2"]
    assert s2["state"] == "running" and s2["target_chunks"] is None and s2["worker_id"]
    assert s2["cache_bytes"] == TINY.cache_layout().capacity_bytes() and s2["memory_rows"] >= 1
    assert streams["s0"]["target_chunks"] == CHUNKS

    d = c.get("/api/streams/s2").json()
    assert d["id"] == "s2" and d["seed"] == 6 and d["history"] and d["log"][0]["event"] == "stream.assigned"

    r = c.get("/api/streams/s2/preview")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    idx = int(r.headers["x-chunk-index"])
    assert c.get(f"/api/streams/s2/preview/{idx}").content == r.content  # the same image, by chunk index

    run = c.get("/api/run").json()
    assert run["streams"] == 3 and len(run["workers"]) == 1 and run["error"] is None

    paths = c.get("/openapi.json").json()["paths"]
    for p in (
        "/api/streams",
        "/api/streams/{stream_id}",
        "/api/streams/{stream_id}/pause",
        "/api/streams/{stream_id}/resume",
        "/api/streams/{stream_id}/stop",
    ):
        assert p in paths, p
    for page in ("/", "/streams/s0", "/assets/dashboard.js", "/assets/dashboard.css"):
        assert c.get(page).status_code == 200, page
    assert stat.S_IMODE(os.stat(live["out"] / "dashboard.token").st_mode) == 0o600
    assert live["url"].startswith("http://127.0.0.1:")


def test_bad_input_404_401_422_and_no_client_paths(live):
    c, token = live["client"], live["token"]
    # unknown ids: JSON 404 everywhere, also for ids that look like paths
    for sid in ("nope", "..", "s0.json", "%2e%2e%2fmanifest.json"):
        r = c.get(f"/api/streams/{sid}")
        assert r.status_code == 404 and "detail" in r.json(), (sid, r.status_code)
        assert c.get(f"/api/streams/{sid}/preview").status_code == 404
        assert c.post(f"/api/streams/{sid}/pause", headers=auth(token)).status_code == 404
    assert c.get("/streams/nope").status_code == 404
    assert c.get("/api/streams/s0/preview/999999").status_code == 404  # a chunk not held
    assert c.get("/api/streams/s0/preview/abc").status_code == 422
    assert c.get("/assets/../run.json").status_code == 404
    # mutations without, or with a wrong, token: 401 before the body is even read
    for headers in ({}, auth("wrong"), {"Authorization": f"Basic {token}"}, {"Authorization": token}):
        r = c.post("/api/streams/s2/pause", headers=headers, content=b"{not json")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
    # malformed bodies with the right token: 422, and the stream is untouched
    for body in (b"{not json", b'{"reason": 5}', b'{"unknown": 1}', b'{"reason": "' + b"x" * 300 + b'"}'):
        r = c.post("/api/streams/s2/pause", headers={**auth(token), "Content-Type": "application/json"}, content=body)
        assert r.status_code == 422, (body[:20], r.status_code, r.text)
    assert c.get("/api/streams/s2").json()["state"] == "running"
    names = {p.name for p in live["out"].iterdir()}
    allowed = {"run.json", "run.lock", "events.jsonl", "streams", "memory", "dashboard.json", "dashboard.token"}
    assert names <= allowed, names


def test_metrics_reach_rays_prometheus_endpoint(live):
    url = f"http://127.0.0.1:{live['metrics_port']}/metrics"
    want = (
        "ray_longroll_chunks_total",
        "ray_longroll_step_seconds",
        "ray_longroll_cache_bytes",
        "ray_longroll_streams",
    )
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        text = httpx.get(url, timeout=10).text
        if all(w in text for w in want) and 'stream_id="s2"' in text:
            break
        time.sleep(1)
    missing = [w for w in want if w not in text]
    assert not missing, f"metrics missing from {url}: {missing}"
    chunks = [line for line in text.splitlines() if line.startswith("ray_longroll_chunks_total{")]
    assert any('stream_id="s2"' in line and 'worker_id="' in line for line in chunks), chunks[:3]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in chunks) >= 2


def test_resume_continues_with_the_same_frames_and_stop_ends_the_run(live, tmp_path):
    c, token, spec = live["client"], live["token"], live["spec"]
    streams = wait_streams(c, lambda s: s["s1"]["state"] == "done", what="s1 done")
    assert streams["s0"]["state"] == "paused"
    assert c.post("/api/streams/s1/pause", headers=auth(token)).status_code == 409  # a finished stream
    r = c.post("/api/streams/s0/resume", headers=auth(token))
    assert r.status_code == 200 and r.json()["state"] in ("pending", "running")
    wait_streams(c, lambda s: s["s0"]["state"] == "done", what="s0 done after resume")
    r = c.post("/api/streams/s2/stop", headers=auth(token))
    assert r.status_code == 200 and r.json()["state"] == "stopped"
    deadline = time.monotonic() + 120
    while ray.get(live["orch"].progress.remote()).state != "stopped":
        assert time.monotonic() < deadline, "run did not end after its last stream stopped"
        time.sleep(0.2)
    check_outputs(replace(spec, streams=spec.streams[:2]), tmp_path)  # s0 and s1 equal the uninterrupted rollout
    events = [json.loads(line)["event"] for line in (Path(spec.out_dir) / "events.jsonl").read_text().splitlines()]
    assert events.count("stream.paused") == 1 and events.count("stream.resumed") == 1
    assert json.loads((spec.stream_dir("s2") / "manifest.json").read_text())["state"] == "stopped"
