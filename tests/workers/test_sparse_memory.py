"""memory="sparse": evicted frames feed a far-history ring that block-sparse attention selects from."""

from dataclasses import replace

import pytest
import torch

from workers.config import ModelConfig
from workers.generator import Generator
from workers.state import StreamState
from workers.types import StreamSpec

SPARSE = ModelConfig.from_name("tiny", memory="sparse", history_frames=9, sparse_top_k=3)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_without_history_sparse_equals_dense_window():
    sparse, dense = Generator(SPARSE), Generator(ModelConfig.from_name("tiny"))
    s, d = sparse.new_stream(StreamSpec("a", seed=4)), dense.new_stream(StreamSpec("a", seed=4))
    for i in range(3):  # the window holds everything so far: nothing to select from
        err = rel(sparse.step([s])[0].latents, dense.step([d])[0].latents)
        print(f"chunk {i}: sparse vs dense rel err {err:.1e}")
        assert err < 1e-5


def test_evicted_frames_enter_the_history_ring_and_memory_stays_fixed():
    gen = Generator(SPARSE)
    st = gen.new_stream(StreamSpec("a", seed=4))
    size = st.cache.nbytes()
    latents = [gen.step([st])[0].latents for _ in range(8)]
    cache = st.cache
    # 24 frames made: sink 0, window = the 6 newest, history ring = the 9 frames evicted last
    assert sorted(cache.frame_index[cache.slots_of("local")].tolist()) == list(range(18, 24))
    assert sorted(cache.frame_index[cache.slots_of("memory")].tolist()) == list(range(9, 18))
    assert cache.memory_written == 17 and cache.nbytes() == size
    dense = Generator(ModelConfig.from_name("tiny"))
    d = dense.new_stream(StreamSpec("a", seed=4))
    dense_lat = [dense.step([d])[0].latents for _ in range(8)]
    assert rel(latents[-1], dense_lat[-1]) > 1e-3  # history was attended


def test_sparse_state_round_trip_is_exact(tmp_path):
    gen = Generator(SPARSE)
    straight = gen.new_stream(StreamSpec("a", seed=6))
    ref = [gen.step([straight])[0].latents for _ in range(9)]
    st = gen.new_stream(StreamSpec("a", seed=6))
    for _ in range(5):
        gen.step([st])
    st.save(tmp_path)
    back = StreamState.load(tmp_path)
    tail = [gen.step([back])[0].latents for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(tail, ref[5:]))


@pytest.mark.parametrize("bad,match", [(dict(attention="mha"), "mla"), (dict(sparse_block=48), "power of two")])
def test_sparse_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        replace(SPARSE, **bad)
