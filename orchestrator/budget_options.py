"""The per-stream memory budget flags of `run`, `generate` and `plan` (see workers/memory_budget.py)."""

from __future__ import annotations

import argparse
import re

from orchestrator import bounds
from orchestrator.cli_common import UsageError
from workers.config import ModelConfig

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
MAX_BUDGET_BYTES = 2**40  # 1 TiB per structure and stream: past it a figure is a typo


def parse_size(flag: str, text: str) -> int:
    """'64MiB' -> 67108864; '0' -> 0. Raises UsageError."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise UsageError(f"{flag}: cannot read a size from {str(text)[:40]!r} (try 64MiB or 0)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size > MAX_BUDGET_BYTES:
        raise UsageError(f"{flag} {str(text)[:40]!r} is over 1 TiB")
    return size


def add_budget_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory budget per stream, --memory retrieval (default: the preset's)")
    g.add_argument(
        "--hot-tier-rows",
        type=int,
        default=None,
        metavar="N",
        help="newest chunks searched in process; older history is searched in LanceDB (default 65536)",
    )
    g.add_argument(
        "--payload-cache", default=None, metavar="SIZE", help="LRU of retrieved latents, e.g. 64MiB (default: preset's)"
    )
    g.add_argument(
        "--encoded-row-cache",
        default=None,
        metavar="SIZE",
        help="encoded memory rows of retrieved chunks on the model's device, e.g. 8MiB; 0: off",
    )


def budget_overrides(args: argparse.Namespace) -> dict:
    """MemoryStoreConfig overrides from the flags given (none: the preset's). Raises UsageError."""
    out: dict = {}
    rows = getattr(args, "hot_tier_rows", None)
    if rows is not None:
        problem = bounds.HOT_TIER_ROWS.problem(rows)
        if problem:
            raise UsageError(f"--hot-tier-rows {problem}")
        out["hot_tier_rows"] = rows
    for flag, key in (("payload_cache", "payload_cache_bytes"), ("encoded_row_cache", "encoded_row_cache_bytes")):
        if getattr(args, flag, None) is not None:
            out[key] = parse_size("--" + flag.replace("_", "-"), getattr(args, flag))
    return out


def check_budget(cfg: ModelConfig, overrides: dict) -> None:
    """Refuse a budget that cannot hold one chunk (UsageError naming the flag)."""
    from workers.memory import MemoryLink
    from workers.memory_budget import budget_problems

    problems = budget_problems(cfg, MemoryLink.store_config("memory", cfg, **overrides))
    if problems:
        raise UsageError(problems[0])
