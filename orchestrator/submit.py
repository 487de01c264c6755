"""`longroll submit`: start `longroll run` on a Ray cluster through Ray's job submission API.

Ray 2.60 clusters may require token authentication. The token is taken from ``--token``, else from
``RAY_AUTH_TOKEN`` / ``~/.ray/auth_token`` when ``RAY_AUTH_MODE=token`` is set (Ray's own client
reads those), and sent as ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import argparse
import os
import shlex

from orchestrator.cli_common import UsageError
from orchestrator.run_options import add_run_options, build_run_spec

_RUN_ACTIONS: list[argparse.Action] = []


def register(sub) -> None:
    p = sub.add_parser("submit", help="submit `longroll run` as a Ray job; prints the job id")
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HOST:8265")
    p.add_argument("--token", default=None, help="Ray auth token (default: RAY_AUTH_TOKEN or ~/.ray/auth_token)")
    p.add_argument(
        "--entrypoint-prefix",
        default="longroll",
        help="how the cluster runs longroll (default `longroll`; e.g. `python -m orchestrator.cli`)",
    )
    _RUN_ACTIONS[:] = add_run_options(p)
    p.set_defaults(func=run)


def run_argv(args) -> list[str]:
    """The `run` options of ``args`` as command-line words (only those that differ from the defaults)."""
    out: list[str] = []
    for a in _RUN_ACTIONS:
        value = getattr(args, a.dest)
        if value == a.default or not a.option_strings:
            continue
        if isinstance(a, argparse._StoreTrueAction):
            out.append(a.option_strings[0])
        elif isinstance(a, argparse._AppendAction):  # repeatable: one flag per value
            for v in value:
                out += [a.option_strings[0], str(v)]
        else:
            out += [a.option_strings[0], str(value)]
    return out


def run(args) -> int:
    if not args.address.startswith(("http://", "https://")):
        raise UsageError(f"--address must be the dashboard's http(s)://HOST:8265 address, got {args.address!r}")
    build_run_spec(args, check_out=False)  # the output directory is on the cluster: checked by the job
    token = args.token or os.environ.get("RAY_AUTH_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else None

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(args.address, headers=headers)
    entrypoint = shlex.join(
        [*shlex.split(args.entrypoint_prefix), "run", "--address", "auto", "--quiet", *run_argv(args)]
    )
    job_id = client.submit_job(entrypoint=entrypoint, metadata={"longroll_out": args.out})
    print(job_id)
    return 0
