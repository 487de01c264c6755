"""Every size an input sets is bounded (orchestrator/bounds.py): exit 2, one `error:` line, nothing written."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from orchestrator import bounds
from orchestrator.cli import build_parser, main
from orchestrator.run_options import build_run_spec, host_problem

ROOT = Path(__file__).resolve().parents[2]
MACHINE = bounds.Machine(cpus=2, memory_bytes=64 * 2**30)  # what the tests assume unless they say otherwise


@pytest.fixture(autouse=True)
def two_cpus(monkeypatch):
    monkeypatch.setattr(bounds, "this_machine", lambda: MACHINE)


def cli(capsys, *args):
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_refused(code, err, needle):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


@pytest.fixture
def files(tmp_path):
    """Input files of the cases, by name; {name} in an argument is replaced with the path."""
    d = tmp_path / "inputs"
    d.mkdir()
    spec = lambda streams: json.dumps({"streams": streams})  # noqa: E731
    texts = {
        "a_file": "not a directory",
        "deep.json": "[" * 100_000 + "]" * 100_000,
        "deep.toml": "a = " + "[" * 100_000 + "]" * 100_000,
        "huge.json": " " * (bounds.MAX_INPUT_FILE_BYTES + 1),
        "many.json": spec([{"id": f"s{i}"} for i in range(bounds.MAX_STREAMS + 1)]),
        "chunks.json": spec([{"id": "a", "chunks": 10**30}]),
        "prompt.json": spec([{"id": "a", "prompt": "x" * (bounds.MAX_PROMPT_BYTES + 1)}]),
        "seed.json": spec([{"id": "a", "seed": True}]),
        "fpc.toml": "frames_per_chunk = 1000\n",
        "steps.toml": "denoising_steps = [" + ", ".join(["500.0"] * 1001) + "]\n",
    }
    paths = {}
    for name, text in texts.items():
        (d / name).write_text(text)
        paths[name.replace(".", "_")] = str(d / name)
    return paths


def refused(capsys, tmp_path, files, cmd, args, needle, out):
    args = [a.format(**files) for a in args]
    code, _, err = cli(capsys, cmd, *args, *out)
    assert_refused(code, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]  # nothing written beside the inputs
    assert not ray.is_initialized()


BIG_PROMPT = "x" * 10_000_000


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--workers", "100000"], "--workers must be <= 1024"),
        (["--workers", "9"], "at most 8 (4x its 2 CPUs)"),
        (["--workers", "3", "--worker-cpus", "3"], "9 CPUs"),
        (["--workers", "600", "--group-size", "2", "--address", "auto"], "1200 worker processes"),
        (["--streams", "100000"], "--streams must be <= 10000"),
        (["--spec", "{many_json}"], "at most 10000"),
        (["--chunks", str(10**30)], "--chunks must be <= 99999999"),
        (["--spec", "{chunks_json}"], "chunks must be <= 99999999"),
        (["--checkpoint-every", str(10**8)], "--checkpoint-every must be <= 99999999"),
        (["--segment-chunks", "0"], "--segment-chunks must be > 0"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints must be > 0"),
        (["--keep-segments", str(10**9)], "--keep-segments must be <="),
        (["--streams-per-worker", "10001"], "--streams-per-worker must be <="),
        (["--group-size", "65"], "--group-size must be <= 64"),
        (["--upscale", "5000"], "--upscale must be <= 16"),
        (["--upscale", "-3"], "--upscale must be > 0"),
        (["--upscale", "0"], "--upscale must be > 0"),
        (["--height", "1024", "--width", "1024", "--upscale", "8"], "at most 4096 px a side"),
        (["--prompt", BIG_PROMPT], "--prompt is 10000000 bytes"),
        (["--spec", "{prompt_json}"], "stream 0: prompt is"),
        (["--spec", "{seed_json}"], "seed must be an integer"),
        (["--seed", str(2**63 - 2), "--streams", "3"], "stream 2: seed must be in"),
        (["--seed", "-1"], "--seed must be in 0..9223372036854775807"),
        (["--worker-cpus", "nan"], "--worker-cpus must be a finite number"),
        (["--worker-cpus", "inf"], "--worker-cpus must be a finite number"),
        (["--worker-cpus", "-1"], "--worker-cpus must be > 0"),
        (["--spec", "{deep_json}"], "nested too deeply"),
        (["--spec", "{deep_toml}"], "nested too deeply"),
        (["--spec", "{huge_json}"], "at most 16777216"),
        (["--stall-timeout", "nan"], "--stall-timeout must be a finite number"),
        (["--stall-timeout", "4"], "--stall-timeout must be in 5..604800"),
        (["--stall-timeout", "1e9"], "--stall-timeout must be in 5..604800"),
        (["--dashboard-allow-host", "http://example.com"], "--dashboard-allow-host must be a host name"),
        (["--dashboard-allow-host", "example.com:80"], "--dashboard-allow-host must be a host name"),
        (["--dashboard-host", "0.0.0.0/8"], "--dashboard-host must be a host name"),
        (["--dashboard-port", "65536"], "--dashboard-port must be in 0..65535"),
        (["--memory-uri", "{a_file}/memory"], "is not writable"),
        (["--memory-uri", "/proc/longroll-memory"], "is not writable"),
        (["--checkpoint-uri", "{a_file}/ckpt"], "is not writable"),
        (["--latent-dim", "100000"], "--latent-dim (d_c) must be <="),
        (["--rope-dim", "0"], "--rope-dim (d_r) must be > 0"),
        (["--sink-frames", "-1"], "--sink-frames must be in 0..1024"),
        (["--window-frames", "100000"], "--window-frames must be <= 4096"),
        (["--frames-per-chunk", "65"], "--frames-per-chunk must be <= 64"),
        (["--denoising-steps", ",".join(["500"] * 1001)], "at most 1000"),
        (["--shift", "nan"], "--shift must be a finite number"),
        (["--shift", "1000"], "--shift must be <= 100"),
        (["--height", "8192"], "--height must be <= 4096"),
        (["--width", "-8"], "--width must be > 0"),
        (["--world", str(2**63)], "--world must be in"),
        (["--config", "{fpc_toml}"], "frames_per_chunk must be <= 64"),
        (["--config", "{steps_toml}"], "at most 1000"),
    ],
)
def test_run_refuses_out_of_bounds(capsys, tmp_path, files, args, needle):
    refused(capsys, tmp_path, files, "run", args, needle, ["--out", str(tmp_path / "out")])


@pytest.mark.parametrize("out", ["{a_file}/run", "/proc/longroll-run"])
def test_run_refuses_unwritable_out(capsys, tmp_path, files, out):
    refused(capsys, tmp_path, files, "run", [], "not writable", ["--out", out.format(**files)])


def test_run_streams_bounded_by_this_machines_memory(capsys, tmp_path, files, monkeypatch):
    from orchestrator.plan import stream_budget
    from workers.config import ModelConfig

    small = bounds.Machine(cpus=2, memory_bytes=100 * 10**6)  # tiny streams hold ~1.7 MB each: ~47 fit in 80 MB
    monkeypatch.setattr(bounds, "this_machine", lambda: small)
    fit = int(small.memory_bytes * bounds.MEMORY_FRACTION) // stream_budget(ModelConfig()).total
    assert 10 < fit < 100
    refused(capsys, tmp_path, files, "run", ["--streams", "100"], f"at most {fit} fit", ["--out", str(tmp_path / "o")])
    # with a capacity per worker only 2 x 10 streams are held at once; on a cluster the memory is unknown
    for extra in (["--workers", "2", "--streams-per-worker", "10"], ["--address", "auto"]):
        args = build_parser().parse_args(["run", "--streams", "100", *extra, "--out", str(tmp_path / "o")])
        assert len(build_run_spec(args).streams) == 100
    assert not (tmp_path / "o").exists()


def test_defaults_still_build_a_run_and_write_nothing(tmp_path):
    args = build_parser().parse_args(["run", "--out", str(tmp_path / "o"), "--dashboard-allow-host", "box.lan"])
    spec = build_run_spec(args)
    assert spec.workers == 2 and len(spec.streams) == 3 and spec.stall_timeout_s == 600.0
    assert list(tmp_path.iterdir()) == []


def test_nan_worker_cpus_twice_through_the_real_cli(tmp_path):
    """Today's bug: nan passed, run.json was written, the rerun said 'already holds a run'."""
    out = tmp_path / "out"
    for _ in range(2):
        r = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "run", "--worker-cpus", "nan", "--out", str(out)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert_refused(r.returncode, r.stderr, "--worker-cpus must be a finite number")
        assert not out.exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--frames", str(10**12)], "needs 333333333334 chunks"),
        (["--chunks", str(10**8)], "--chunks must be <= 99999999"),
        (["--chunks", "1000000"], "keeps 73.7 GB of latents"),
        (["--threads", "-1"], "--threads must be > 0"),
        (["--threads", "0"], "--threads must be > 0"),
        (["--threads", "100000"], "--threads must be <= 8"),
        (["--upscale", "5000"], "--upscale must be <= 16"),
        (["--upscale", "-3"], "--upscale must be > 0"),
        (["--upscale", "0"], "--upscale must be > 0"),
        (["--height", "2048", "--width", "2048", "--upscale", "4"], "8192x8192 px"),
        (["--prompt", BIG_PROMPT], "--prompt is 10000000 bytes"),
        (["--seed", str(2**63)], "--seed must be in"),
        (["--world", "-1"], "--world must be in"),
        (["--memory-uri", "{a_file}/m"], "is not writable"),
        (["--memory-uri", "/proc/longroll-m"], "is not writable"),
        (["--trajectory", "{deep_json}"], "nested too deeply"),
        (["--trajectory", "{huge_json}"], "at most 16777216"),
    ],
)
def test_generate_refuses_out_of_bounds(capsys, tmp_path, files, args, needle):
    base = ["--out", str(tmp_path / "v.mp4")] + ([] if {"--frames", "--chunks"} & set(args) else ["--frames", "5"])
    refused(capsys, tmp_path, files, "generate", args, needle, base)


@pytest.mark.parametrize("out", ["/proc/v.mp4", "{a_file}/v.mp4"])
def test_generate_refuses_unwritable_out(capsys, tmp_path, files, out):
    refused(capsys, tmp_path, files, "generate", ["--frames", "5"], "", ["--out", out.format(**files)])


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--hours", "nan"], "--hours must be a finite number"),
        (["--hours", "inf"], "--hours must be a finite number"),
        (["--hours", "1e400"], "--hours must be a finite number"),
        (["--hours", "-1"], "--hours must be > 0"),
        (["--hours", "0"], "--hours must be > 0"),
        (["--hours", "87601"], "--hours must be <= 87600"),
        (["--gpu-mem", "9" * 400 + "GB"], "must be 1 B..16 TiB"),
        (["--gpu-mem", "0.1B"], "must be 1 B..16 TiB"),
        (["--frames-per-chunk", "0"], "--frames-per-chunk must be > 0"),
    ],
)
def test_plan_refuses_out_of_bounds(capsys, tmp_path, files, args, needle):
    refused(capsys, tmp_path, files, "plan", args, needle, [])


@pytest.mark.parametrize(
    "cmd, args, needle",
    [
        ("train-world", ["--steps", "0"], "--steps must be > 0"),
        ("train-world", ["--steps", str(10**8)], "--steps must be <="),
        ("train-world", ["--batch", "5000"], "--batch must be <= 4096"),
        ("train-world", ["--lr", "nan"], "--lr must be a finite number"),
        ("train-world", ["--lr", "0"], "--lr must be > 0"),
        ("train-world", ["--threads", "9"], "--threads must be <= 8"),
        ("train-world", ["--out", "{a_file}/tw"], "not writable"),
        ("train-embedder", ["--steps", "0"], "--steps must be > 0"),
        ("train-embedder", ["--embedding-dim", "5000"], "--embedding-dim must be <= 4096"),
        ("train-embedder", ["--seed", "-1"], "--seed must be in"),
        ("train-embedder", ["--out", "/proc/emb"], "not writable"),
    ],
)
def test_training_commands_refuse_out_of_bounds(capsys, tmp_path, files, cmd, args, needle):
    out = [] if "--out" in args else ["--out", str(tmp_path / "t")]
    extra = ["--memory", str(tmp_path / "inputs")] if cmd == "train-embedder" else []
    refused(capsys, tmp_path, files, cmd, args, needle, out + extra)


COMMAND_TABLES = {
    "run": {**bounds.RUN_FLAGS, **bounds.MODEL_FLAGS, **bounds.WORLD_FLAGS},
    "submit": {**bounds.RUN_FLAGS, **bounds.MODEL_FLAGS, **bounds.WORLD_FLAGS},
    "generate": {**bounds.GENERATE_FLAGS, **bounds.MODEL_FLAGS, **bounds.WORLD_FLAGS},
    "plan": {**bounds.PLAN_FLAGS, **bounds.MODEL_FLAGS},
    "train-world": bounds.TRAIN_WORLD_FLAGS,
    "train-embedder": bounds.TRAIN_EMBEDDER_FLAGS,
}


def subparsers() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_numeric_flag_has_a_bound_and_its_default_lies_in_it():
    for name, parser in subparsers().items():
        table = COMMAND_TABLES.get(name, {})
        for action in parser._actions:
            if action.type not in (int, float):
                continue
            if action.dest == "threads":  # the machine's: bounds.threads_range
                assert name in ("generate", "train-world")
                continue
            assert action.dest in table, f"{name} {action.option_strings[0]} has no bound in orchestrator/bounds.py"
            if action.default is not None:
                assert table[action.dest].problem(action.default) is None, (name, action.dest)


def test_the_caps_keep_a_runs_frames_within_int64():
    max_t_stride = 4  # the Wan VAE's temporal stride, the largest of any preset
    fpc = bounds.ROLLOUT["frames_per_chunk"].hi
    assert bounds.MAX_STREAMS * (bounds.MAX_CHUNKS + 1) * fpc * max_t_stride < bounds.INT64_MAX
    assert len(f"{bounds.MAX_CHUNKS:08d}") == 8  # next_chunk included: segment and checkpoint names keep 8 digits


@pytest.mark.parametrize("host", ["localhost", "box.lan", "box.lan.", "a-b.example.com", "10.0.0.7", "::1", "[::1]"])
def test_host_names_and_ip_literals_pass(host):
    assert host_problem(host) is None


@pytest.mark.parametrize(
    "host", ["", "http://a", "a:80", "a/b", "a b", " a", "-a", "a-", "a..b", "999.1.1.1", "[a]", "x" * 254, "a" * 64]
)
def test_malformed_host_names_fail(host):
    assert host_problem(host) is not None


def test_too_many_allowed_hosts(capsys, tmp_path, files):
    hosts = [w for i in range(bounds.MAX_ALLOW_HOSTS + 1) for w in ("--dashboard-allow-host", f"h{i}.lan")]
    refused(capsys, tmp_path, files, "run", hosts, "at most 64", ["--out", str(tmp_path / "out")])


def test_range_rejects_other_types():
    assert "integer" in bounds.CHUNKS.problem(True)
    assert "integer" in bounds.CHUNKS.problem(2.0)
    assert "number" in bounds.STALL_TIMEOUT.problem("600")
    assert bounds.STALL_TIMEOUT.problem(600) is None
