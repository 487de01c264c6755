"""`longroll train-embedder`: train the conv-autoencoder retrieval embedder on stored history."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator import bounds
from orchestrator.cli_common import UsageError, check_flags, check_writable_location
from workers.types import validate_stream_id


def register(sub) -> None:
    p = sub.add_parser(
        "train-embedder",
        help="train the conv-AE retrieval embedder (Window Temporal Delta + reconstruction) on stored history",
    )
    p.add_argument("--memory", required=True, help="LanceDB database URI holding the history (e.g. RUN/memory)")
    p.add_argument("--out", required=True, help="directory for embedder.safetensors + embedder.json")
    p.add_argument("--streams", nargs="*", default=None, help="stream ids to train on (default: all)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--embedding-dim", type=int, default=64, help="embedding size (must match the store)")
    p.add_argument("--seed", type=int, default=0, help="sampling and initialisation seed")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    # imported here: LanceDB's runtime is not fork-safe, so the CLI loads it only when it is used
    from memory_store.config import MemoryStoreConfig
    from memory_store.conv_ae import train_embedder
    from memory_store.db import connect, list_streams

    check_flags(args, bounds.TRAIN_EMBEDDER_FLAGS)
    check_writable_location("--out", args.out)
    uri = args.memory
    if "://" not in uri and not Path(uri).is_dir():
        raise UsageError(f"memory database not found: {uri}")
    available = list_streams(connect(MemoryStoreConfig(uri=uri, embedding_dim=args.embedding_dim)))
    streams = args.streams or available
    for sid in streams:
        try:
            validate_stream_id(sid)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if sid not in available:
            raise UsageError(f"stream {sid!r} has no history in {uri}")
    if not streams:
        raise UsageError(f"no stream history in {uri}")
    result = train_embedder(
        uri, streams, args.steps, out_dir=args.out, embedding_dim=args.embedding_dim, seed=args.seed
    )
    summary = {
        "out": str(result.out_dir),
        "streams": streams,
        "steps": result.steps,
        "frames": result.frames,
        "first_loss": result.first_loss,
        "final_loss": result.final_loss,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"trained on {result.frames} frames of {len(streams)} stream(s), {result.steps} steps: "
            f"loss {result.first_loss:.4f} -> {result.final_loss:.4f}; wrote {result.out_dir}"
        )
    return 0
