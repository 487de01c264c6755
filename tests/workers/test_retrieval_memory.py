"""memory="retrieval" end to end on a real LanceDB directory: slots fill, outputs change, resume is exact."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from memory_store.db import connect, open_chunk_table, read_chunk_indices
from workers.config import ModelConfig
from workers.generator import Generator
from workers.memory import MemoryLink, default_embedder
from workers.state import StreamState
from workers.types import StreamSpec
from workers.video import read_mp4

CFG = replace(ModelConfig.from_name("tiny"), memory="retrieval")
ROOT = Path(__file__).resolve().parents[2]


def run(gen, link, state, n):
    out = []
    for _ in range(n):
        (ch,) = gen.step([state])
        link.publish(ch)
        out.append(ch)
    return out


def test_memory_slots_fill_with_evicted_history_only(tmp_path):
    with MemoryLink(str(tmp_path / "db"), CFG) as link:
        gen = Generator(CFG, memory=link.retriever, embedder=default_embedder(CFG))
        st = gen.new_stream(StreamSpec("m1", seed=5))
        chunks = run(gen, link, st, 9)
    # chunk i may use chunks < i - window_chunks - R = i - 3
    for ch in chunks:
        assert all(c < ch.chunk_index - CFG.window_chunks - CFG.memory_exclude_recent + 1 for c in ch.memory_chunks)
        assert len(ch.memory_chunks) <= CFG.retrieval_k
    assert chunks[3].memory_chunks == () and len(chunks[4].memory_chunks) == 1
    assert len(chunks[8].memory_chunks) == CFG.retrieval_k
    assert all(ch.embedding is not None and ch.embedding.shape == (CFG.embedding_dim,) for ch in chunks)


def test_retrieved_memory_changes_the_output(tmp_path):
    window = Generator(replace(CFG, memory="window"))
    w = [window.step([s])[0] for s in [window.new_stream(StreamSpec("m1", seed=5))] for _ in range(7)]
    with MemoryLink(str(tmp_path / "db"), CFG) as link:
        gen = Generator(CFG, memory=link.retriever, embedder=default_embedder(CFG))
        r = run(gen, link, gen.new_stream(StreamSpec("m1", seed=5)), 7)
    assert torch.equal(r[3].latents, w[3].latents)  # nothing retrieved yet: same frames
    assert not torch.equal(r[6].latents, w[6].latents)  # memory entered the attention


def test_resume_in_fresh_process_retrieves_the_same_history(tmp_path):
    with MemoryLink(str(tmp_path / "straight"), CFG) as link:
        gen = Generator(CFG, memory=link.retriever, embedder=default_embedder(CFG))
        straight = run(gen, link, gen.new_stream(StreamSpec("m1", seed=9)), 12)

    db = str(tmp_path / "split")
    with MemoryLink(db, CFG) as link:
        gen = Generator(CFG, memory=link.retriever, embedder=default_embedder(CFG))
        st = gen.new_stream(StreamSpec("m1", seed=9))
        head = run(gen, link, st, 6)
        link.writer.flush()
        version = link.writer.table_version("m1")
        st.save(tmp_path / "ckpt")
    (tmp_path / "cfg.json").write_text(json.dumps(CFG.to_dict()))
    script = f"""
import json, torch
from safetensors.torch import save_file
from workers.config import ModelConfig
from workers.generator import Generator
from workers.memory import MemoryLink, default_embedder
from workers.state import StreamState
torch.set_num_threads({torch.get_num_threads()})  # CPU GEMMs split their work by thread count: match this process
cfg = ModelConfig.from_dict(json.load(open({str(tmp_path / "cfg.json")!r})))
with MemoryLink({db!r}, cfg) as link:
    link.open_stream("m1", version={version})
    gen = Generator(cfg, memory=link.retriever, embedder=default_embedder(cfg))
    st = StreamState.load({str(tmp_path / "ckpt")!r})
    lat, mem = [], []
    for _ in range(6):
        (ch,) = gen.step([st])
        link.publish(ch)
        lat.append(ch.latents)
        mem.append(list(ch.memory_chunks))
save_file({{"lat": torch.stack(lat)}}, {str(tmp_path / "tail.safetensors")!r})
json.dump(mem, open({str(tmp_path / "mem.json")!r}, "w"))
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, cwd=ROOT)
    from safetensors.torch import load_file

    tail = load_file(tmp_path / "tail.safetensors")["lat"]
    mem = json.loads((tmp_path / "mem.json").read_text())
    assert [list(c.memory_chunks) for c in straight[6:]] == mem
    assert any(mem)
    assert torch.equal(torch.stack([c.latents for c in head]), torch.stack([c.latents for c in straight[:6]]))
    assert torch.equal(tail, torch.stack([c.latents for c in straight[6:]]))
    state = StreamState.load(tmp_path / "ckpt")
    assert state.memory_query is not None and state.next_chunk == 6


def test_generate_cli_with_retrieval_memory(tmp_path, capsys):
    from orchestrator.cli import main

    out = tmp_path / "r.mp4"
    assert main(["generate", "--frames", "24", "--out", str(out), "--memory", "retrieval", "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["memory"] == "retrieval" and read_mp4(out).shape[0] == 24
    table = open_chunk_table(
        connect(MemoryLink.store_config(summary["memory_uri"], CFG)), "generate", CFG.embedding_dim
    )
    assert read_chunk_indices(table).tolist() == list(range(8))
    # a second run into the same explicit database is refused (its history belongs to another rollout)
    assert (
        main(
            [
                "generate",
                "--frames",
                "3",
                "--out",
                str(tmp_path / "b.mp4"),
                "--memory",
                "retrieval",
                "--memory-uri",
                summary["memory_uri"],
                "--quiet",
            ]
        )
        == 2
    )
    assert "already holds" in capsys.readouterr().err
