"""`run` / `stop` / `resume` / `status` input checks: one `error:` line, exit 2, nothing started or written."""

import json

import pytest
import ray

from orchestrator.cli import main


def cli(capsys, *args):
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--spec", "{spec_slash}"], "invalid stream id"),
        (["--spec", "{spec_dotdot}"], "invalid stream id"),
        (["--spec", "{spec_zero_chunks}"], "chunks must be a positive integer"),
        (["--spec", "{spec_bad_toml}"], "not valid TOML/JSON"),
        (["--spec", "{spec_bad_json}"], "not valid TOML/JSON"),
        (["--spec", "{spec_dup}"], "duplicate stream id"),
        (["--streams", "0"], "--streams must be > 0"),
        (["--streams", "-2"], "--streams must be > 0"),
        (["--chunks", "0"], "--chunks must be > 0"),
        (["--chunks", "-5"], "--chunks must be > 0"),
        (["--workers", "0"], "--workers must be > 0"),
        (["--checkpoint-every", "0"], "--checkpoint-every must be > 0"),
        (["--checkpoint-every", "6", "--segment-chunks", "4"], "must divide"),
        (["--preset", "huge"], "unknown preset"),
        (["--memory", "bogus"], "invalid choice"),
        (["--streams", "abc"], "invalid int value"),
        (["--dashboard-port", "70000"], "--dashboard-port must be in 0..65535"),
        (["--dashboard-port", "-1"], "--dashboard-port must be in 0..65535"),
        (["--dashboard-port", "8000", "--no-dashboard"], "not allowed with argument"),
    ],
)
def test_bad_run_input_one_line_exit_2_nothing_started(capsys, tmp_path, args, message):
    specs = {
        "spec_slash": ('[[streams]]\nid = "a/b"\n', "toml"),
        "spec_dotdot": ('{"streams": [{"id": ".."}]}', "json"),
        "spec_zero_chunks": ('[[streams]]\nid = "a"\nchunks = 0\n', "toml"),
        "spec_bad_toml": ("[[streams]\nid = 'a'\n", "toml"),
        "spec_bad_json": ('{"streams": [', "json"),
        "spec_dup": ('[[streams]]\nid = "a"\n[[streams]]\nid = "a"\n', "toml"),
    }
    paths = {}
    for name, (text, ext) in specs.items():
        paths[name] = tmp_path / f"{name}.{ext}"
        paths[name].write_text(text)
    out = tmp_path / "out"
    args = [a.format(**paths) for a in args]
    code, stdout, stderr = cli(capsys, "run", *args, "--out", str(out))
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert not out.exists() and not ray.is_initialized()


def test_resume_stop_status_on_missing_run(capsys, tmp_path):
    for cmd in (["resume"], ["stop", "--all"], ["status"]):
        code, _, err = cli(capsys, *cmd, "--out", str(tmp_path / "nothing"))
        assert code == 2 and err.startswith("error: no run in"), err
    assert not ray.is_initialized()


def test_stop_needs_ids_or_all_and_known_ids(capsys, tmp_path):
    from orchestrator.registry import RunSpec, StreamEntry
    from workers.config import ModelConfig
    from workers.types import StreamSpec

    RunSpec(str(tmp_path), ModelConfig().to_dict(), [StreamEntry(StreamSpec("a"), 4)]).save()
    assert cli(capsys, "stop", "--out", str(tmp_path))[0] == 2
    code, _, err = cli(capsys, "stop", "zz", "--out", str(tmp_path))
    assert code == 2 and "unknown stream ids" in err
    code, out, _ = cli(capsys, "stop", "a", "--out", str(tmp_path))
    assert code == 0 and (tmp_path / "control" / "stop-a").exists()
    code, out, _ = cli(capsys, "status", "--json", "--out", str(tmp_path))
    assert code == 0 and json.loads(out)["stop_requested"] == ["a"]


def test_existing_run_directory_is_refused(capsys, tmp_path):
    (tmp_path / "run.json").write_text("{}")
    code, _, err = cli(capsys, "run", "--out", str(tmp_path))
    assert code == 2 and "already holds a run" in err
