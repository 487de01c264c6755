"""Housekeeping under the run lock: temporaries of interrupted writes go, committed files and the
memory store stay; an events.jsonl line cut mid-write is cut off."""

import json

from orchestrator.run_dir import append_event, partial_files, repair_events, sweep_partial_files


def test_sweep_removes_only_the_temporaries_of_interrupted_writes(tmp_path):
    keep = ["run.json", "run.lock", "streams/s0/manifest.json", "streams/s0/segments/00000000-00000007.mp4",
            "streams/s0/checkpoints/00000008/meta.json", "memory/s0.lance/.tmp-12-abcd0123", ".gitkeep"]  # fmt: skip
    gone = ["streams/s0/.manifest.json.tmp-12-abcd0123", "streams/s0/segments/.open-00000008.mp4",
            "streams/s0/segments/..open-00000008.mp4.tmp-77.mp4", ".dashboard.token.12.tmp",
            "streams/s0/checkpoints/00000016/state.safetensors.tmp-1a2b3c4d"]  # fmt: skip
    for name in keep + gone:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert sorted(str(p.relative_to(tmp_path)) for p in partial_files(tmp_path)) == sorted(gone)
    assert len(sweep_partial_files(tmp_path)) == len(gone)
    assert all((tmp_path / n).exists() for n in keep) and not any((tmp_path / n).exists() for n in gone)


def test_an_events_line_cut_mid_write_is_cut_off_and_appends_stay_whole(tmp_path):
    append_event(tmp_path, {"event": "a"})
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"event": "b", "ti')  # a writer killed mid-line
    assert repair_events(tmp_path) and not repair_events(tmp_path)
    append_event(tmp_path, {"event": "c"})
    assert [json.loads(ln)["event"] for ln in (tmp_path / "events.jsonl").read_text().splitlines()] == ["a", "c"]
