"""`longroll train-embedder` over history written by `generate --memory retrieval`."""

import json

from orchestrator.cli import main


def run(capsys, *args):
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_train_embedder_on_generated_history(tmp_path, capsys):
    code, out, err = run(
        capsys,
        "generate",
        "--frames",
        "30",
        "--out",
        str(tmp_path / "g.mp4"),
        "--memory",
        "retrieval",
        "--quiet",
        "--json",
    )
    assert code == 0, err
    uri = json.loads(out)["memory_uri"]
    code, out, err = run(
        capsys, "train-embedder", "--memory", uri, "--out", str(tmp_path / "emb"), "--steps", "5", "--json"
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["streams"] == ["generate"] and res["frames"] == 30 and res["steps"] == 5
    assert (tmp_path / "emb" / "embedder.safetensors").is_file() and (tmp_path / "emb" / "embedder.json").is_file()
    # bad input: unknown stream, missing database, zero steps -> one error line, exit 2, nothing written
    for args, needle in [(["--streams", "nope"], "no history"), (["--steps", "0"], "--steps")]:
        code, _, err = run(capsys, "train-embedder", "--memory", uri, "--out", str(tmp_path / "x"), *args)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "train-embedder", "--memory", str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    assert code == 2 and "not found" in err
    assert not (tmp_path / "x").exists()
