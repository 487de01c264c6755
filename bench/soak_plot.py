"""The soak benchmark's report: summary numbers, target checks, the table and the figure.

Works on the records of ``DIR/soak.jsonl`` as written by ``bench/soak.py`` (plain dicts, so a report can
be made of a run that is still going, or of one that died): ``session`` records (config, machine, where
the session started) and ``sample`` records. ``write_report(DIR)`` writes ``DIR/soak.json`` and
``DIR/soak.png`` and prints the summary table.

Definitions (the module docstring of bench/soak.py repeats them):

- warm-up: the first ``min(10,000, 5% of the run)`` frames; "at 10k" is the first sample past it.
- slope per 100,000 frames: least squares over the samples past the warm-up.
- curves of the process (RSS, open files, threads, CUDA memory) are measured over the newest session
  only, its warm-up counted from the frame it resumed at: a restart starts a fresh process.
- rates and latencies at a point are the median of up to 3 samples there (one interval is noisy);
  sizes are the sample itself.
- disk per frame is per *latent* frame, of all streams; the payload is the float16 latents of one latent
  frame plus a third of a chunk's 64-float embedding (the store's own bytes, without any overhead).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tables import table  # noqa: E402

WARMUP_FRAMES = 10_000
WARMUP_SHARE = 0.05
PER = 100_000  # slopes per this many frames
RSS_GROWTH_MAX_PCT = 2.0
FPS_TOLERANCE = 0.05
DISK_PAYLOAD_MAX = 1.2
FLAT_TAIL = 0.8  # store: RSS must be flat over the last 80% of the run


def read_records(out: Path) -> tuple[list[dict], list[dict]]:
    """(session records, sample records) of ``out/soak.jsonl``; a torn last line is skipped."""
    sessions, samples = [], []
    path = out / "soak.jsonl"
    if not path.is_file():
        return sessions, samples
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("type") == "session":
            sessions.append(rec)
        elif rec.get("type") == "sample":
            samples.append(rec)
    return sessions, samples


# ---- derived per-sample values ------------------------------------------------------------------
def latent_frames(s: dict, cfg: dict) -> float:
    """Latent frames of all streams at sample ``s``."""
    return s["frames"] / cfg["video_frames_per_latent"] * cfg["streams"]


def derived(s: dict, cfg: dict) -> dict:
    lf = max(latent_frames(s, cfg), 1e-9)
    return {
        **s,
        "memory_disk_per_frame": s["memory_disk_bytes"] / lf,
        "other_disk_per_frame": s["other_disk_bytes"] / lf,
    }


# (key, label, unit, kind): kind "process" = fitted over the newest session; smoothed = median of 3
CURVES: list[tuple[str, str, str, str, bool]] = [
    ("rss_mib", "RSS", "MiB", "process", False),
    ("rss_anon_mib", "RSS, anonymous", "MiB", "process", False),
    ("rss_file_mib", "RSS, mapped files", "MiB", "process", False),
    ("memory_disk_per_frame", "store disk / latent frame", "B", "run", False),
    ("other_disk_per_frame", "rest of DIR / latent frame", "B", "run", False),
    ("memory_disk_bytes", "store disk", "B", "run", False),
    ("frames_per_s", "frames/s (all streams)", "/s", "run", True),
    ("chunks_per_s", "chunks/s (all streams)", "/s", "run", True),
    ("frames_per_cpu_s", "frames per CPU-second", "/s", "run", True),
    ("retrieval_p50_ms", "retrieval p50", "ms", "run", True),
    ("retrieval_p99_ms", "retrieval p99", "ms", "run", True),
    ("num_fds", "open files", "", "process", False),
    ("threads", "threads", "", "process", False),
    ("cuda_allocated_mib", "CUDA allocated", "MiB", "process", False),
]


def warmup_frames(start: int, end: int) -> float:
    return start + min(WARMUP_FRAMES, WARMUP_SHARE * max(end - start, 0))


def _series(samples: list[dict], key: str) -> list[tuple[int, float]]:
    return [(s["frames"], float(s[key])) for s in samples if s.get(key) is not None]


def _point(series: list[tuple[int, float]], i: int, smooth: bool, forward: bool) -> tuple[int, float]:
    """(frames, value) at index i; smoothed: median of up to 3 samples from i onwards / up to i."""
    if not smooth:
        return series[i]
    part = series[i : i + 3] if forward else series[max(0, i - 2) : i + 1]
    return series[i][0], float(np.median([v for _, v in part]))


def slope(series: list[tuple[int, float]]) -> float | None:
    """Least-squares slope per PER frames, None with fewer than 2 distinct frame counts."""
    if len({f for f, _ in series}) < 2:
        return None
    x = np.array([f for f, _ in series], dtype=np.float64)
    y = np.array([v for _, v in series], dtype=np.float64)
    return float(np.polyfit(x, y, 1)[0] * PER)


def curve_summary(samples: list[dict], key: str, smooth: bool, start: int) -> dict | None:
    """Reference point past the warm-up, end point, slope: of samples taken from frame ``start`` on."""
    series = [p for p in _series(samples, key) if p[0] >= start]
    if not series:
        return None
    w = warmup_frames(start, series[-1][0])
    past = [p for p in series if p[0] >= w] or series[-1:]
    ref_i = series.index(past[0])
    ref_f, ref_v = _point(series, ref_i, smooth, forward=True)
    end_f, end_v = _point(series, len(series) - 1, smooth, forward=False)
    return {"ref_frames": ref_f, "ref": ref_v, "end_frames": end_f, "end": end_v, "slope_per_100k": slope(past),
            "warmup_frames": w, "samples": len(past)}  # fmt: skip


def payload_per_latent_frame(cfg: dict) -> float:
    c, h, w = cfg["latent_shape"]
    return c * h * w * 2 + cfg["embedding_dim"] * 4 / cfg["frames_per_chunk"]


def _check(value: float | None, ok: Callable[[float], bool]) -> bool | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else bool(ok(value))


def summarize(sessions: list[dict], samples: list[dict]) -> dict:
    """Every number of the table, and the targets: JSON-able."""
    cfg = sessions[0]["config"]
    rows = [derived(s, cfg) for s in samples]
    running = [s for s in rows if not s.get("final")]
    last_session = sessions[-1]["session"]
    process_start = sessions[-1]["start_frames"]
    newest = [s for s in running if s["session"] == last_session]
    curves = {}
    for key, _, _, kind, smooth in CURVES:
        part, start = (newest, process_start) if kind == "process" else (running, 0)
        c = curve_summary(part, key, smooth, start)
        if c is not None:
            curves[key] = c
    final = next((s for s in reversed(rows) if s.get("final")), rows[-1] if rows else None)
    payload = payload_per_latent_frame(cfg)
    out = {
        "frames": rows[-1]["frames"] if rows else 0,
        "target_frames": sessions[-1]["config"]["frames"],
        "sessions": len(sessions),
        "restarts": len(sessions) - 1,
        "curves": curves,
        "payload_bytes_per_latent_frame": payload,
        "store_bytes_per_latent_frame_final": final["memory_disk_per_frame"] if final else None,
        "final_after_maintenance": bool(final and final.get("final")),
    }
    out["disk_vs_payload"] = (out["store_bytes_per_latent_frame_final"] or 0) / payload if final else None
    rss = curves.get("rss_mib")
    out["rss_growth_pct"] = (rss["end"] / rss["ref"] - 1) * 100 if rss and rss["ref"] else None
    fps = curves.get("frames_per_s")
    out["fps_ratio"] = fps["end"] / fps["ref"] if fps and fps["ref"] else None
    anon = curves.get("rss_anon_mib")
    out["rss_anon_growth_pct"] = (anon["end"] / anon["ref"] - 1) * 100 if anon and anon["ref"] else None
    cpu = curves.get("frames_per_cpu_s")
    out["fps_cpu_ratio"] = cpu["end"] / cpu["ref"] if cpu and cpu["ref"] else None
    out["rss_flat_tail_pct"] = _flat_tail_pct(newest, process_start)
    out["targets"] = _targets(cfg, out, curves)
    return out


def _flat_tail_pct(samples: list[dict], start: int) -> float | None:
    """(max / min - 1) in % of RSS over the last FLAT_TAIL of the newest session."""
    series = [p for p in _series(samples, "rss_mib") if p[0] >= start]
    if len(series) < 2:
        return None
    cut = series[-1][0] - FLAT_TAIL * (series[-1][0] - start)
    tail = [v for f, v in series if f >= cut]
    return (max(tail) / min(tail) - 1) * 100


def _targets(cfg: dict, out: dict, curves: dict) -> dict:
    t = {
        "rss_growth_le_2pct": _check(out["rss_growth_pct"], lambda v: v <= RSS_GROWTH_MAX_PCT),
        "fps_within_5pct": _check(out["fps_ratio"], lambda v: abs(v - 1) <= FPS_TOLERANCE),
        "disk_le_1.2x_payload": _check(out["disk_vs_payload"], lambda v: v <= DISK_PAYLOAD_MAX),
    }
    if cfg["kind"] == "store":
        budget = cfg["p99_budget_ms"]
        p99 = curves.get("retrieval_p99_ms")
        t["rss_flat_2pct_last_80pct"] = _check(out["rss_flat_tail_pct"], lambda v: v <= RSS_GROWTH_MAX_PCT)
        t[f"retrieval_p99_le_{budget:g}ms"] = _check(p99["end"] if p99 else None, lambda v: v <= budget)
    return t


# ---- printing ---------------------------------------------------------------------------------
def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "B":
        for u, d in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if abs(v) >= d:
                return f"{v / d:.3g} {u}"
        return f"{v:.4g} B"
    return f"{v:.4g}" + ("" if not unit else unit if unit.startswith("/") else " " + unit)


def print_summary(cfg: dict, summary: dict) -> None:
    rows = []
    for key, label, unit, kind, _ in CURVES:
        c = summary["curves"].get(key)
        if c is None:
            continue
        sl = c["slope_per_100k"]
        rows.append([label + (" *" if kind == "process" else ""), f"{_fmt(c['ref'], unit)} @{c['ref_frames']:,}",
                     f"{_fmt(c['end'], unit)} @{c['end_frames']:,}",
                     "-" if sl is None else (("+" if sl >= 0 else "") + _fmt(sl, unit))])  # fmt: skip
    what = cfg["kind"] + (f" --memory {cfg['memory']}" if cfg["kind"] == "model" else f" --payload {cfg['payload']}")
    table(f"soak {what}: {summary['frames']:,} of {summary['target_frames']:,} frames per stream, "
          f"{cfg['streams']} stream(s), {summary['restarts']} restart(s)",
          ["curve", "at 10k (warm-up)", "at end", "slope / 100k frames"], rows)  # fmt: skip
    print("  * newest session only (a restart starts a fresh process)")
    payload = summary["payload_bytes_per_latent_frame"]
    store = summary["store_bytes_per_latent_frame_final"]
    checks = [
        ["RSS growth 10k -> end", _fmt(summary["rss_growth_pct"], "%"), f"<= {RSS_GROWTH_MAX_PCT:g} %"],
        ["frames/s end / 10k", _fmt(summary["fps_ratio"]), f"1 +- {FPS_TOLERANCE:g}"],
        ["store disk / payload per latent frame",
         f"{_fmt(store, 'B')} / {_fmt(payload, 'B')} = {_fmt(summary['disk_vs_payload'])}"
         + ("" if summary["final_after_maintenance"] else " (no final maintenance yet)"),
         f"<= {DISK_PAYLOAD_MAX:g}"],
    ]  # fmt: skip
    if cfg["kind"] == "store":
        p99 = summary["curves"].get("retrieval_p99_ms")
        checks.append(["RSS max/min over last 80 %", _fmt(summary["rss_flat_tail_pct"], "%"), "<= 2 %"])
        checks.append(["retrieval p99 at end", _fmt(p99["end"] if p99 else None, "ms"),
                       f"<= {cfg['p99_budget_ms']:g} ms"])  # fmt: skip
    verdicts = list(summary["targets"].values())
    for row, ok in zip(checks, verdicts):
        row.append({True: "holds", False: "FAILS", None: "n/a"}[ok])
    table("targets", ["target", "value", "bound", "verdict"], checks)
    print(
        f"  beside them: anonymous RSS growth 10k -> end {_fmt(summary.get('rss_anon_growth_pct'), '%')} "
        f"(mapped libraries' pages excluded); frames per CPU-second end / 10k "
        f"{_fmt(summary.get('fps_cpu_ratio'))} (the process's own CPU time: other load on the machine "
        "does not move it)"
    )


# ---- figure -----------------------------------------------------------------------------------
def plot(path: Path, cfg: dict, sessions: list[dict], samples: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [derived(s, cfg) for s in samples if not s.get("final")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    x = np.array([s["frames"] for s in rows], dtype=np.float64)

    def line(ax, key: str, label: str, scale: float = 1.0, **kw) -> None:
        pts = [(xi, s[key] / scale) for xi, s in zip(x, rows) if s.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=label, **kw)

    line(axes[0, 0], "rss_mib", "RSS")
    line(axes[0, 0], "rss_anon_mib", "anonymous", ls="--")
    line(axes[0, 0], "rss_file_mib", "mapped files (libraries)", ls=":")
    axes[0, 0].set_ylabel("RSS (MiB)")
    ax = axes[0, 1]
    line(ax, "memory_disk_per_frame", "memory store (LanceDB)", 1e3)
    line(ax, "other_disk_per_frame", "segments + checkpoints", 1e3)
    final = [derived(s, cfg) for s in samples if s.get("final")]
    if final:
        f = final[-1]
        ax.plot([f["frames"]], [f["memory_disk_per_frame"] / 1e3], "o", color="C0", label="store after maintenance")
    payload = payload_per_latent_frame(cfg) / 1e3
    ax.axhline(payload, color="grey", ls=":", label="payload (fp16 latents + embedding)")
    ax.axhline(DISK_PAYLOAD_MAX * payload, color="red", ls=":", label=f"{DISK_PAYLOAD_MAX:g}x payload")
    ax.set_ylabel("disk per latent frame (kB)")
    ax.set_ylim(bottom=0)
    rate = "chunks_per_s" if cfg["kind"] == "store" else "frames_per_s"
    line(axes[1, 0], rate, rate.replace("_per_s", "/s"))
    if cfg["kind"] == "model":
        line(axes[1, 0], "frames_per_cpu_s", "frames per CPU-second of the process", ls="--")
    axes[1, 0].set_ylabel(rate.replace("_per_s", "/s") + " (all streams)")
    axes[1, 0].set_ylim(bottom=0)
    line(axes[1, 1], "retrieval_p99_ms", "p99")
    line(axes[1, 1], "retrieval_p50_ms", "p50", ls="--")
    if cfg["kind"] == "store":
        axes[1, 1].axhline(cfg["p99_budget_ms"], color="red", ls=":", label="p99 budget")
    if not any(s.get("retrieval_p99_ms") is not None for s in rows):
        axes[1, 1].text(0.5, 0.5, "no retrieval in this run", ha="center", va="center",
                        transform=axes[1, 1].transAxes)  # fmt: skip
    axes[1, 1].set_ylabel("retrieval (ms)")
    axes[1, 1].set_ylim(bottom=0)
    restarts = [s["frames"] for s in rows if s.get("restart")]
    for a in axes.flat:
        for r in restarts:
            a.axvline(r, color="orange", lw=0.8, ls="--")
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8, loc="best")
    for a in axes[1]:
        a.set_xlabel("frames per stream" + (" (video)" if cfg["video_frames_per_latent"] > 1 else ""))
    m = sessions[-1]["machine"]
    what = f"model --memory {cfg['memory']}" if cfg["kind"] == "model" else f"store --payload {cfg['payload']}"
    title = f"soak {what}, {cfg['streams']} stream(s); {m['cpu']} ({m['cores']} cores), torch {m['torch']}"
    fig.suptitle(title + f", {m['date'][:10]}" + ("; restarts dashed" if restarts else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, quiet: bool = False) -> dict | None:
    """soak.json + soak.png of ``out``, and the table on stdout. None when there is nothing to report."""
    sessions, samples = read_records(out)
    if not sessions or not samples:
        return None
    cfg = sessions[0]["config"]
    summary = summarize(sessions, samples)
    doc = {"config": sessions[-1]["config"], "machine": sessions[-1]["machine"], "sessions": sessions,
           "samples": samples, "summary": summary}  # fmt: skip
    tmp = out / "soak.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out / "soak.json")
    plot(out / "soak.png", cfg, sessions, samples)
    if not quiet:
        print_summary(cfg, summary)
        print(f"\nwrote {out / 'soak.json'} and {out / 'soak.png'}")
    return summary
