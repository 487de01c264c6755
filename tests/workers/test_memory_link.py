"""MemoryLink: checkpoints pin the table version they record; stale pins are dropped."""

from dataclasses import replace

import numpy as np

from workers.config import ModelConfig
from workers.generator import Generator
from workers.memory import MemoryLink, checkpoint_tag, default_embedder
from workers.types import StreamSpec

CFG = replace(ModelConfig.from_name("tiny"), memory="retrieval")


def test_checkpoint_pins_survive_cleanup_and_stale_pins_go(tmp_path):
    with MemoryLink(str(tmp_path / "db"), CFG, keep_versions=1) as link:
        gen = Generator(CFG, memory=link.retriever, embedder=default_embedder(CFG))
        st = gen.new_stream(StreamSpec("p1"))
        versions = {}
        kept: list[int] = []
        for _ in range(3):
            for _ in range(3):
                link.publish(gen.step([st])[0])
            versions[st.next_chunk] = link.pin_checkpoint("p1", st.next_chunk)
            kept = [*kept, st.next_chunk][-2:]  # a checkpoint store keeping the newest 2
            link.release_checkpoints("p1", kept)
        assert link.checkpoint_tags("p1") == [checkpoint_tag(6), checkpoint_tag(9)]
        for _ in range(3):
            link.publish(gen.step([st])[0])
        link.writer.maintain("p1")  # compaction + cleanup of unpinned versions
        # the pinned version of the checkpoint at chunk 6 still reads exactly chunks 0..5
        hits = link.retriever.search("p1", np.ones(CFG.embedding_dim, np.float32), 20, before_chunk=100,
                                     version=versions[6])  # fmt: skip
        assert sorted(h.chunk_index for h in hits) == list(range(6))
