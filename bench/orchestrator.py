"""Control-plane benchmarks of the Ray orchestrator. Prints one table of figures measured in one run.

(a) frames/s of one stream hosted in a GeneratorWorker actor (driven by `step` calls) over the bare
    in-process loop of the same model (both 1 torch thread, no output written);
(b) throughput cost of one checkpoint per minute: the measured seconds of one checkpoint of a stream
    (safetensors + JSON through pyarrow.fs, commit record) divided by 60 s;
(c) seconds from a worker SIGKILL until all of its streams produce again (an Orchestrator run of
    4 infinite tiny streams on 2 workers);
(d) 1,000 streams with the stub generator on a simulated 8-node `ray.cluster_utils.Cluster`:
    orchestrator time (outside waits) per chunk, and seconds to reassign every stream of a removed node.

    python bench/orchestrator.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

# this file is named like the package it measures: keep its folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import ray  # noqa: E402
import torch  # noqa: E402

from orchestrator.actor import start_orchestrator  # noqa: E402
from orchestrator.registry import RunSpec, StreamEntry, request_stop  # noqa: E402
from workers.checkpoints import CheckpointStore  # noqa: E402
from workers.config import ModelConfig  # noqa: E402
from workers.generator import Generator  # noqa: E402
from workers.messages import StreamAssignment, WorkerSettings  # noqa: E402
from workers.types import StreamSpec  # noqa: E402
from workers.worker import GeneratorWorker  # noqa: E402

TINY = ModelConfig.from_name("tiny")


def wait_progress(orch, pred, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            p = ray.get(orch.progress.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.2)
            continue
        if pred(p):
            return p
        time.sleep(0.05)
    raise TimeoutError("benchmark condition not reached")


def bench_a(chunks: int, tmp: Path) -> dict:
    torch.set_num_threads(1)
    gen = Generator(TINY)
    state = gen.new_stream(StreamSpec("bare"))
    gen.step([state])  # warm-up
    t0 = time.perf_counter()
    for _ in range(chunks):
        gen.step([state])
    bare = chunks * TINY.frames_per_chunk / (time.perf_counter() - t0)

    settings = WorkerSettings(out_dir=str(tmp / "a"), model=TINY.to_dict(), write_output=False)
    w = GeneratorWorker.options(num_cpus=1).remote("bench-a", settings)
    ray.get(w.assign.remote(StreamAssignment(StreamSpec("hosted"), None)))
    ray.get(w.step.remote())  # warm-up
    t0 = time.perf_counter()
    frames = sum(ray.get(w.step.remote()).frames for _ in range(chunks))
    hosted = frames / (time.perf_counter() - t0)
    ray.kill(w)
    return {"bare_fps": bare, "ray_fps": hosted, "ratio": hosted / bare}


def bench_b(tmp: Path, repeats: int = 20) -> dict:
    gen = Generator(TINY)
    state = gen.new_stream(StreamSpec("ckpt"))
    for _ in range(8):
        gen.step([state])
    store = CheckpointStore(str(tmp / "b"), "ckpt", keep=3)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        store.save(state, {"memory_table_version": 0})
        times.append(time.perf_counter() - t0)
        state.next_chunk += 1  # a new directory each time, as in a run
    t = sorted(times)[len(times) // 2]
    return {"checkpoint_s": t, "cost_per_minute": t / 60.0}


def bench_c(tmp: Path) -> dict:
    out = tmp / "c"
    streams = [StreamEntry(StreamSpec(f"c{i}", seed=i), None) for i in range(4)]
    spec = RunSpec(str(out), TINY.to_dict(), streams, workers=2, checkpoint_every=4, segment_chunks=2, upscale=1)
    spec.save()
    orch = start_orchestrator(spec.out_dir)
    p = wait_progress(orch, lambda p: len(p.workers) == 2 and min(s.next_chunk for s in p.streams) >= 6)
    victim = max(p.workers, key=lambda w: len(w.stream_ids))
    t_kill = time.time()
    os.kill(victim.pid, signal.SIGKILL)
    p = wait_progress(orch, lambda p: p.recoveries and p.recoveries[0].resumed_at is not None)
    rec = p.recoveries[0]
    request_stop(spec.out_dir, None)
    wait_progress(orch, lambda p: p.state == "stopped")
    ray.kill(orch, no_restart=True)
    return {"kill_to_detect_s": rec.lost_at - t_kill, "kill_to_produce_s": rec.resumed_at - t_kill,
            "streams": len(rec.streams)}


def bench_d(tmp: Path, n_streams: int, chunks: int, nodes: int) -> dict:
    from ray.cluster_utils import Cluster

    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    node_list = [c.add_node(num_cpus=1) for _ in range(nodes)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        out = tmp / "d"
        streams = [StreamEntry(StreamSpec(f"d{i}"), chunks) for i in range(n_streams)]
        spec = RunSpec(str(out), TINY.to_dict(), streams, workers=nodes, stub=True)
        spec.save()
        orch = start_orchestrator(spec.out_dir)
        wait_progress(orch, lambda p: p.state == "running" and len(p.workers) == nodes
                      and min(s.next_chunk for s in p.streams) >= 2)
        p = wait_progress(orch, lambda p: min(s.next_chunk for s in p.streams) >= chunks // 3)
        c0, s0 = p.chunks, p.control_seconds
        p = wait_progress(orch, lambda p: min(s.next_chunk for s in p.streams) >= 2 * chunks // 3)
        per_chunk = (p.control_seconds - s0) / max(p.chunks - c0, 1)
        by_node = {w.node_id: w for w in p.workers}
        lost = next(n for n in node_list if n.node_id in by_node)
        t_remove = time.time()
        c.remove_node(lost)
        p = wait_progress(orch, lambda p: p.recoveries and p.recoveries[0].resumed_at is not None)
        rec = p.recoveries[0]
        p = wait_progress(orch, lambda p: p.state == "done")
        ray.kill(orch, no_restart=True)
        return {"streams": n_streams, "nodes": nodes, "overhead_ms_per_chunk": per_chunk * 1e3,
                "chunks_measured": p.chunks, "lost_streams": len(rec.streams),
                "remove_to_produce_s": rec.resumed_at - t_remove}
    finally:
        ray.shutdown()
        c.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer chunks (noisier figures)")
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=8)
    args = ap.parse_args()
    chunks_a = 30 if args.quick else 120
    chunks_d = 30 if args.quick else 90
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        a = bench_a(chunks_a, tmp)
        b = bench_b(tmp)
        c = bench_c(tmp)
        ray.shutdown()
        dd = bench_d(tmp, args.streams, chunks_d, args.nodes)
    print("| figure | value | target |")
    print("|---|---|---|")
    print(f"| (a) Ray-hosted / bare frames/s ({a['ray_fps']:.1f} / {a['bare_fps']:.1f}) | {a['ratio']:.3f} | >= 0.97 |")
    print(f"| (b) one checkpoint ({b['checkpoint_s'] * 1e3:.1f} ms) per minute: throughput cost | "
          f"{b['cost_per_minute'] * 100:.3f} % | <= 2 % |")
    print(f"| (c) worker SIGKILL -> its {c['streams']} streams produce again (detected after "
          f"{c['kill_to_detect_s']:.2f} s) | {c['kill_to_produce_s']:.2f} s | <= 15 s + regeneration |")
    print(f"| (d) orchestrator time per chunk, {dd['streams']} stub streams on {dd['nodes']} nodes | "
          f"{dd['overhead_ms_per_chunk']:.4f} ms | <= 1 ms |")
    print(f"| (d) node removed -> its {dd['lost_streams']} streams produce again | "
          f"{dd['remove_to_produce_s']:.2f} s | reported |")


if __name__ == "__main__":
    main()
