"""Per-stream byte budgets: each bound holds over many chunks, and an unusable budget is refused."""

import subprocess
import sys
from dataclasses import replace

import torch

from memory_store.hot_tier import HotTier
from workers.config import ModelConfig
from workers.generator import Generator
from workers.memory import MemoryLink, default_embedder
from workers.memory_budget import budget_problems, chunk_payload_bytes, chunk_row_bytes, memory_budget
from workers.types import StreamSpec

CFG = replace(ModelConfig.from_name("tiny"), memory="retrieval")


def rollout(tmp_path, name, n, **budget):
    """n chunks of one stream; returns (chunks, per-chunk memory_bytes() samples, generator)."""
    with MemoryLink(str(tmp_path / name), CFG, **budget) as link:
        gen = Generator(CFG, memory=link.retriever, embedder=default_embedder(CFG))
        st = gen.new_stream(StreamSpec("b0", seed=3))
        chunks, samples = [], []
        for _ in range(n):
            (ch,) = gen.step([st])
            link.publish(ch)
            chunks.append(ch)
            samples.append(gen.memory_bytes())
        return chunks, samples, gen


def test_every_retrieval_structure_stays_within_its_budget(tmp_path):
    rows = chunk_row_bytes(CFG)
    budget = dict(hot_tier_rows=16, payload_cache_bytes=4 * (chunk_payload_bytes(CFG) + 128),
                  encoded_row_cache_bytes=3 * rows)  # fmt: skip
    chunks, samples, gen = rollout(tmp_path, "db", 50, **budget)
    for s in samples:
        assert s["encoded_rows"] <= 3 * rows
        assert s["payload_cache"] <= budget["payload_cache_bytes"]
        assert s["prefetches_in_flight"] <= 1
        assert s["hot_tier"] <= 16 * HotTier.row_bytes(CFG.embedding_dim)
        assert s["pending_payloads"] <= 256 * chunk_payload_bytes(CFG)  # held until durable: the writer queue
    late = samples[30:]
    assert len({s["hot_tier"] for s in late}) == 1  # the tier's arrays stopped growing
    assert max(s["encoded_rows"] for s in late) == 3 * rows  # the LRU fills to its budget, not past it
    assert gen.encodes > 3  # misses past the budget re-encode
    assert max(max(ch.memory_chunks, default=0) for ch in chunks) > 0


def test_a_small_hot_tier_retrieves_what_an_unbounded_one_does(tmp_path):
    # history below the tier's floor is searched (exactly, no index yet) in LanceDB: same choices, same frames
    small, _, _ = rollout(tmp_path, "small", 26, hot_tier_rows=6)
    big, _, _ = rollout(tmp_path, "big", 26)
    assert [c.memory_chunks for c in small] == [c.memory_chunks for c in big]
    assert any(min(c.memory_chunks, default=99) < c.chunk_index - 6 for c in small[16:])  # cold history was used
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(small, big))


def test_budget_figures_and_problems():
    b = memory_budget(CFG, MemoryLink.store_config("m", CFG))
    assert b.chunk_payload == 3 * 3 * 32 * 32 * 2 and b.chunk_rows == chunk_row_bytes(CFG)
    assert b.hot_tier == 65_536 * (64 * 4 + 66 + 16) and b.encoded_rows == 8 * 2**20
    assert memory_budget(replace(CFG, memory="window"), MemoryLink.store_config("m", CFG)).hot_tier == 0
    assert budget_problems(CFG, MemoryLink.store_config("m", CFG)) == []
    bad = MemoryLink.store_config("m", CFG, payload_cache_bytes=100, encoded_row_cache_bytes=10)
    problems = budget_problems(CFG, bad)
    assert len(problems) == 2 and "--payload-cache" in problems[0] and "--encoded-row-cache" in problems[1]
    assert budget_problems(CFG, MemoryLink.store_config("m", CFG, encoded_row_cache_bytes=0)) == []  # off


def test_cli_refuses_a_budget_that_cannot_hold_one_chunk(tmp_path):
    out = tmp_path / "v.safetensors"
    cmd = [sys.executable, "-m", "orchestrator.cli", "generate", "--memory", "retrieval", "--chunks", "2",
           "--latents-out", str(out), "--payload-cache", "1KB"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --payload-cache"), p.stderr
    assert not out.exists() and not list(tmp_path.iterdir())
    p = subprocess.run([*cmd[:-2], "--encoded-row-cache", "12 parsecs"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: --encoded-row-cache"), p.stderr
