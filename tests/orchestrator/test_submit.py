"""`longroll submit` against a real `ray start --head` cluster with its dashboard and Ray 2.60's
token authentication: without the token it fails with one error line; with it, the printed job id
runs `longroll run` on the cluster to completion.

The test's cluster does not have the virtual environment on its PATH, so the job's entrypoint is
this interpreter (`--entrypoint-prefix`); on a real cluster the default `longroll` is used."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.orchestrator.test_resume_after_ray_stop import RAY, ROOT, free_port, kill_cluster  # noqa: F401

pytestmark = pytest.mark.slow


def test_submit_with_token_auth_runs_the_job(tmp_path):
    port, dash = free_port(), free_port()
    log = tmp_path / "ray.log"
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=4", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats"],
            stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        token = subprocess.run([RAY, "get-auth-token"], capture_output=True, text=True, env=env, check=True)
        token = token.stdout.strip().splitlines()[-1]
        address = f"http://127.0.0.1:{dash}"
        out = tmp_path / "run"
        args = [sys.executable, "-m", "orchestrator.cli", "submit", "--address", address, "--streams", "2",
                "--chunks", "4", "--workers", "1", "--checkpoint-every", "2", "--segment-chunks", "2",
                "--out", str(out), "--entrypoint-prefix", f"{sys.executable} -m orchestrator.cli"]  # fmt: skip
        no_token = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=no_token, timeout=120)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and "uthentication" in r.stderr
        r = subprocess.run(args + ["--token", token], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        job_id = r.stdout.strip()
        assert job_id.startswith("raysubmit_")

        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
        deadline = time.monotonic() + 240
        while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                 JobStatus.STOPPED):  # fmt: skip
            assert time.monotonic() < deadline, client.get_job_logs(job_id)[-2000:]
            time.sleep(1)
        info = client.get_job_info(job_id)
        assert status == JobStatus.SUCCEEDED, (info.message, client.get_job_logs(job_id)[-2000:])
        assert info.entrypoint.endswith(f"--out {out}") and " run --address auto" in info.entrypoint
        for sid in ("s0", "s1"):
            m = json.loads((out / "streams" / sid / "manifest.json").read_text())
            assert m["state"] == "done" and m["chunks_done"] == 4
            assert len(list((out / "streams" / sid / "segments").glob("*.mp4"))) == 2
    finally:
        kill_cluster(proc, [])
