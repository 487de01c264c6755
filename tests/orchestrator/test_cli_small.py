"""Small CLI contracts: output piped into a reader that stops early, and the embedded cluster's size."""

import subprocess
import sys
from pathlib import Path

import ray

from orchestrator import driver
from orchestrator.registry import RunSpec, StreamEntry
from workers.config import ModelConfig
from workers.types import StreamSpec

ROOT = Path(__file__).resolve().parents[2]


def test_output_piped_into_a_reader_that_stops_early_is_not_an_error(tmp_path):
    # `longroll status | head -1` on a run of 5000 streams: far more than a pipe buffers, so the writer
    # meets a closed pipe; it must end quietly, not with a traceback or an `error: BrokenPipeError` line
    RunSpec(str(tmp_path), ModelConfig().to_dict(), [StreamEntry(StreamSpec(f"s{i}"), 4) for i in range(5000)]).save()
    cmd = f"{sys.executable} -m orchestrator.cli status --out {tmp_path} | head -1"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith(f"run {tmp_path}"), r
    assert "Error" not in r.stderr and r.returncode == 0, r.stderr


def test_an_embedded_cluster_has_a_cpu_for_every_rank_of_every_group(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    spec = RunSpec(str(tmp_path), ModelConfig().to_dict(), [StreamEntry(StreamSpec("a"), 4)], workers=3,
                   group_size=4, worker_cpus=2.0)  # fmt: skip
    driver.connect(None, spec)
    assert seen["num_cpus"] >= 3 * 4 * 2
