"""The command-line contract of `generate` and `plan`: results, bad input, nothing half-written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers.video import read_mp4

ROOT = Path(__file__).resolve().parents[2]


def longroll(*args, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def longroll_inproc(capsys, *args):
    """Run main() in this process (fast); returns (exit code, stdout, stderr)."""
    from orchestrator.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_readme_demo_command_writes_a_decodable_video(tmp_path):
    """The README's first command: `make demo` (its venv already exists when the tests run)."""
    out = tmp_path / "demo.mp4"
    r = subprocess.run(
        ["make", "-s", "demo", f"DEMO_OUT={out}", f"VENV={Path(sys.prefix)}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    frames = read_mp4(out)
    assert frames.shape[0] >= 240 and frames.shape[1:] == (128, 128, 3)
    assert "frames/s" in r.stdout and "cache" in r.stdout
    assert frames.std() > 1  # not a blank video


def test_generate_json_summary_and_exact_frame_count(tmp_path):
    out = tmp_path / "x.mp4"
    r = longroll("generate", "--frames", "7", "--out", str(out), "--attention", "mha", "--upscale", "2", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["frames"] == 7 and summary["attention"] == "mha" and summary["cache_bytes"] > 0
    assert read_mp4(out).shape == (7, 64, 64, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["x.mp4"]  # no temporary left behind


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--preset", "huge"], "unknown preset"),
        (["--frames", "0"], "--frames must be > 0"),
        (["--frames", "-3"], "--frames must be > 0"),
        (["--out", "/nonexistent-dir/x.mp4"], "does not exist"),
        (["--out", "{tmp}/x.avi"], "must end in .mp4"),
        (["--rope-dim", "5"], "d_r"),
        (["--latent-dim", "0"], "d_c"),
        (["--latent-dim", "4000"], "d_c"),
        (["--preset", "wan-1.3b"], "no VAE decoder"),
        (["--attention", "gqa"], "invalid choice"),
        (["--frames", "ten"], "invalid int value"),
    ],
)
def test_generate_bad_input_one_error_line_exit_2(tmp_path, capsys, args, needle):
    base = {"--frames": "5", "--out": str(tmp_path / "v.mp4")}
    extra = [a.replace("{tmp}", str(tmp_path)) for a in args]
    for i in range(0, len(extra) - 1):
        if extra[i] in base:
            base.pop(extra[i])
    cmd = ["generate"] + [x for kv in base.items() for x in kv] + extra
    code, _, err = longroll_inproc(capsys, *cmd)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_generate_unwritable_directory():
    r = longroll("generate", "--frames", "3", "--out", "/sys/v.mp4")
    assert r.returncode == 2 and "not writable" in r.stderr


def test_plan_json_wan_mla_meets_videomla_reduction():
    r = longroll("plan", "--preset", "wan-1.3b", "--attention", "mla", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    for key in ("cache_bytes_per_token", "mha_cache_bytes_per_token", "cache_bytes_per_stream", "streams_per_gpu"):
        assert key in p
    assert p["mha_cache_bytes_per_token"] == 30 * 2 * 1536 * 2
    assert 1 - p["cache_bytes_per_token"] / p["mha_cache_bytes_per_token"] >= 0.927
    assert p["streams_per_gpu"] > 0


def test_plan_fp8_and_more_memory_fits_more_streams(capsys):
    def plan(*a):
        code, out, err = longroll_inproc(capsys, "plan", "--preset", "wan-1.3b", "--json", *a)
        assert code == 0, err
        return json.loads(out)

    fp8 = plan("--cache-dtype", "fp8")
    assert fp8["cache_reduction_pct"] >= 96.0
    assert plan("--gpu-mem", "141GiB")["streams_per_gpu"] > plan("--gpu-mem", "80GB")["streams_per_gpu"]
    mha = plan("--attention", "mha")
    assert mha["cache_bytes_per_token"] == mha["mha_cache_bytes_per_token"]


@pytest.mark.parametrize("args", [["--gpu-mem", "lots"], ["--gpu-mem", "0GB"], ["--hours", "0"], ["--preset", "nope"]])
def test_plan_bad_input(capsys, args):
    code, _, err = longroll_inproc(capsys, "plan", *args)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_plan_human_table(capsys):
    code, out, _ = longroll_inproc(capsys, "plan", "--preset", "tiny")
    assert code == 0 and "streams per GPU" in out and "% less" in out


def wan_1_3b_params(d=1536, layers=30, ffn=8960, text=4096, freq=256, chans=16) -> int:
    """Wan2.1-T2V-1.3B's parameter count written out from its architecture (not from any model class)."""
    attn = 4 * (d * d + d) + 2 * d  # q, k, v, o with biases; q/k RMSNorm weights across heads
    block = 2 * attn + 2 * d + (d * ffn + ffn + ffn * d + d) + 6 * d  # self + cross, norm2 affine, FFN, modulation
    top = (chans * 4 * d + d) + (text * d + d + d * d + d) + (freq * d + d + d * d + d) + (d * 6 * d + 6 * d)
    return layers * block + top + (d * chans * 4 + chans * 4) + 2 * d  # + proj_out, head modulation


def test_plan_self_forcing_sizes_the_real_model(capsys):
    code, out, err = longroll_inproc(capsys, "plan", "--preset", "self-forcing-1.3b", "--json")
    assert code == 0, err
    p = json.loads(out)
    assert p["params"] == wan_1_3b_params() and 1.41e9 < p["params"] < 1.43e9  # "1.3B"
    assert p["weights_bytes"] == 2 * p["params"]  # bf16
    assert p["cache_bytes_per_frame"] == 1560 * 30 * 2 * 1536 * 2  # 287.5 MB of bf16 K/V per latent frame
    assert p["context_frames"] == 18 and p["text_kv_bytes_per_stream"] == 2 * 30 * 512 * 1536 * 2
    assert p["cache_bytes_per_stream"] == 18 * p["cache_bytes_per_frame"] + 18 * 8 + p["text_kv_bytes_per_stream"]
    from transformers import UMT5EncoderModel

    from workers.models.wan.text import umt5_xxl_config

    with torch.device("meta"):
        umt5 = sum(t.numel() for t in UMT5EncoderModel(umt5_xxl_config()).parameters())
    assert p["text_encoder_bytes"] == 2 * umt5  # umT5-XXL in bf16
    code, out, _ = longroll_inproc(capsys, "plan", "--preset", "longlive-1.3b")
    assert code == 0 and "text K/V per stream" in out and "umT5-XXL" in out
