"""Generator groups and stream migration: prints two tables of ratios measured in one run.

(a) chunk time of one generator over 1 vs 2 ranks (torch.distributed, gloo on CPU, one thread per rank;
    processes started with spawn), against the single-process Generator;
(b) moving a stream between two GeneratorWorker actors on a local Ray: direct (export_streams ->
    object store -> import_streams) vs the checkpoint round trip (release, which checkpoints, then
    assign, which loads the newest checkpoint).

    python bench/groups.py [--streams 2] [--chunks 10] [--moves 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.config import ModelConfig  # noqa: E402
from workers.types import StreamSpec  # noqa: E402

CFG = ModelConfig.from_name("tiny")


def _rank(rank: int, size: int, port: int, streams: int, chunks: int, q) -> None:
    import torch.distributed as dist

    from workers.group_parallel import Comm, GroupGenerator

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    gen = GroupGenerator(CFG, Comm())
    states = [gen.new_stream(StreamSpec(f"s{i}", seed=i)) for i in range(streams)]
    for _ in range(2):  # warm-up
        gen.step(states)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(chunks):
        gen.step(states)
    if rank == 0:
        q.put((time.perf_counter() - t0) / chunks)
    dist.destroy_process_group()


def group_chunk_ms(size: int, streams: int, chunks: int, port: int) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, size, port, streams, chunks, q)) for r in range(size)]
    for p in procs:
        p.start()
    out = q.get(timeout=600)
    for p in procs:
        p.join()
    return out * 1e3


def single_chunk_ms(streams: int, chunks: int) -> float:
    from workers.generator import Generator

    torch.set_num_threads(1)
    gen = Generator(CFG)
    states = [gen.new_stream(StreamSpec(f"s{i}", seed=i)) for i in range(streams)]
    for _ in range(2):
        gen.step(states)
    t0 = time.perf_counter()
    for _ in range(chunks):
        gen.step(states)
    return (time.perf_counter() - t0) / chunks * 1e3


def migration_ms(moves: int) -> tuple[float, float, int]:
    """(direct ms, checkpoint round trip ms, state bytes) per move of one stream between two workers."""
    import ray

    from workers.messages import StreamAssignment, WorkerSettings
    from workers.worker import GeneratorWorker

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tempfile.mkdtemp(prefix="bench-groups-")
        s = WorkerSettings(out_dir=out, model=CFG.to_dict(), checkpoint_every=1, segment_chunks=1,
                           preview_every_s=None)  # fmt: skip
        a, b = (GeneratorWorker.options(num_cpus=1).remote(w, s) for w in ("a", "b"))
        spec = StreamAssignment(StreamSpec("m0", seed=1), None)
        ray.get(a.assign.remote(spec))
        for _ in range(3):
            ray.get(a.step.remote())
        src, dst = a, b
        direct, ckpt, nbytes = [], [], 0
        for i in range(2 * moves):
            ray.get(src.step.remote())  # the stream advances between moves (the checkpoint path must write)
            t0 = time.perf_counter()
            if i % 2 == 0:
                handoffs = ray.get(src.export_streams.remote(["m0"]))
                ray.get(dst.import_streams.remote(handoffs))
                direct.append(time.perf_counter() - t0)
                nbytes = handoffs[0].nbytes
            else:
                ray.get(src.release.remote(["m0"]))
                ray.get(dst.assign.remote(spec))
                ckpt.append(time.perf_counter() - t0)
            src, dst = dst, src
        for h in (a, b):
            ray.kill(h)
    finally:
        ray.shutdown()
    med = lambda xs: sorted(xs)[len(xs) // 2] * 1e3  # noqa: E731
    return med(direct), med(ckpt), nbytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=2, help="streams stepped together")
    p.add_argument("--chunks", type=int, default=10, help="timed chunks per configuration")
    p.add_argument("--moves", type=int, default=10, help="moves of each kind (median reported)")
    args = p.parse_args()
    port = 29500 + os.getpid() % 1000
    single = single_chunk_ms(args.streams, args.chunks)
    g1 = group_chunk_ms(1, args.streams, args.chunks, port)
    g2 = group_chunk_ms(2, args.streams, args.chunks, port + 1)
    print(f"(a) tiny preset, {args.streams} streams per step, {args.chunks} chunks, 1 thread per rank, gloo")
    print("| configuration | ms per step | vs single process |")
    print("|---|---|---|")
    for name, ms in (("single-process Generator", single), ("group of 1 rank", g1), ("group of 2 ranks", g2)):
        print(f"| {name} | {ms:.1f} | {ms / single:.2f} |")
    print(f"| 2 ranks / 1 rank | | {g2 / g1:.2f} |")
    direct, ckpt, nbytes = migration_ms(args.moves)
    print(f"\n(b) one stream ({nbytes} bytes of state), median of {args.moves} moves of each kind")
    print("| move | ms |")
    print("|---|---|")
    print(f"| direct (object store) | {direct:.1f} |")
    print(f"| checkpoint round trip (release + assign) | {ckpt:.1f} |")
    print(f"| direct / checkpoint | {direct / ckpt:.2f} |")


if __name__ == "__main__":
    main()
