"""The `longroll` command line. Contract: exit 0 on success, 2 on bad input (one `error: ...` line
on stderr, nothing half-written), 1 on a runtime failure."""

from __future__ import annotations

import argparse
import json
import sys

from orchestrator.logs import configure_logging
from workers.config import MEMORY_MODES, PRESETS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + two lines otherwise)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--attention", choices=["mha", "mla"], default=None, help="KV cache kind (default: preset's)")
    p.add_argument("--latent-dim", type=int, default=None, help="MLA latent width d_c (default: preset's)")
    p.add_argument("--rope-dim", type=int, default=None, help="MLA decoupled RoPE key width d_r (default: preset's)")
    p.add_argument(
        "--cache-dtype",
        choices=["fp32", "bf16", "fp16", "fp8"],
        default=None,
        help="cache storage dtype (fp8: e4m3 MLA latent with per-token scales)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="longroll", description="Day-scale autoregressive video rollouts.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate one stream in this process and write an mp4")
    _model_options(g)
    g.add_argument("--frames", type=int, required=True, help="number of frames to generate")
    g.add_argument("--out", required=True, help="output .mp4 file")
    g.add_argument("--memory", choices=list(MEMORY_MODES[:1]), default=None, help="history policy")
    g.add_argument("--seed", type=int, default=0, help="stream seed: chunk i's noise depends on (seed, i)")
    g.add_argument("--prompt", default="", help="hashed into the stream's conditioning vector")
    g.add_argument("--upscale", type=int, default=4, help="nearest-neighbour upscale of the written video")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--json", action="store_true", help="print the summary as JSON")
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("plan", help="size a deployment: cache per token/stream, streams per GPU, store growth")
    _model_options(p)
    p.add_argument("--gpu-mem", default="80GB", help="memory of one GPU, e.g. 80GB or 141GiB")
    p.add_argument("--hours", type=float, default=24.0, help="length of one stream")
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(fmt="console" if sys.stderr.isatty() else "json", level="warning")
    try:
        return _dispatch(args)
    except ValueError as e:  # UsageError and config validation: bad input
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence: one line, exit 1
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    if args.command == "generate":
        from orchestrator.generate import run_generate

        summary = run_generate(args)
        if args.json:
            print(json.dumps(summary))
        else:
            print(
                f"wrote {summary['out']}: {summary['frames']} frames in {summary['seconds']:.1f} s "
                f"= {summary['fps']:.1f} frames/s; {summary['attention']} cache {summary['cache_bytes'] / 1e6:.2f} MB "
                f"({summary['cache_bytes_per_token']:.0f} bytes/token)"
            )
        return 0
    if args.command == "plan":
        from orchestrator.generate import build_config
        from orchestrator.plan import format_plan, parse_bytes, plan

        result = plan(build_config(args), parse_bytes(args.gpu_mem), args.hours)
        print(json.dumps(result, indent=1) if args.json else format_plan(result))
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
