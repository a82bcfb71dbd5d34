"""`surfdiff train|sample CONFIG --executor slurm`: the command, validated here, runs as one Slurm job.

The job runs the same `surfdiff` command line (its own options, less --executor, --hpc-settings and --no-wait,
so it runs locally in the job) through `deploy.slurm.submit_stage_job`, on the settings' GPU (`gres`).
The rss, relax and run commands take the same two options, as one `ExecutorSpec` that `deploy.slurm.open_executor`
opens into the executor their stages fan out on.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

# The options that choose where a command runs: the job's own command line leaves them out.
SLURM_OPTIONS = ("executor", "hpc_settings", "no_wait")


def add_executor_options(p: argparse.ArgumentParser, slurm: str, *, wait: bool = False) -> None:
    """--executor {local,slurm} and --hpc-settings PATH (and --no-wait for a command that is one job)."""
    p.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help=f"slurm: {slurm} (see deploy/README.md)")
    p.add_argument("--hpc-settings", default=None, metavar="PATH",
                   help="Slurm settings YAML (deploy/hpc/slurm.yaml); SURFDIFF_HPC_* variables win")
    if wait:
        p.add_argument("--no-wait", action="store_true", help="--executor slurm: print the job id and return")
    p.set_defaults(parser=p)  # job_argv rebuilds the job's command line from this parser's own options


def job_argv(parser: argparse.ArgumentParser, args: argparse.Namespace,
             drop: Sequence[str] = SLURM_OPTIONS) -> list[str]:
    """The options of `args` that differ from their defaults, as a command line of `parser` again (positionals
    left out: the job gets its config separately), without the `drop` ones. Built from the parsed values, so
    abbreviations (`--hpc s.yaml`) and `--opt=value` forms are dropped or kept alike."""
    out: list[str] = []
    for action in parser._actions:  # argparse keeps no public list of a parser's options
        if not action.option_strings or action.dest in drop or action.help == argparse.SUPPRESS:
            continue
        value = getattr(args, action.dest, action.default)
        if value is None or value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            out.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(action, argparse._StoreTrueAction):
            out.append(flag)
        elif isinstance(value, list | tuple) and action.nargs is not None:  # nargs=2: LO HI
            out += [flag, *(str(v) for v in value)]
        else:  # --opt=value: a value that starts with '-' stays a value; a list `type` (I,J,..) joined again
            out.append(f"{flag}={','.join(map(str, value)) if isinstance(value, list | tuple) else value}")
    return out


def run_as_slurm_job(kind: str, args: argparse.Namespace) -> int:
    """Submit the validated command as one Slurm job; wait for it unless --no-wait. Its failure: one line, 1."""
    from deploy.hpc import load_settings
    from deploy.slurm import failure_line, submit_stage_job
    from surfdiff_core.errors import SurfdiffError

    settings = load_settings(args.hpc_settings)  # a bad settings file: one line, nothing submitted
    try:
        job = submit_stage_job(kind, args.config, settings, job_argv(args.parser, args))
    except Exception as exc:  # noqa: BLE001 - sbatch refused it (partition, account, ...): its own words
        raise SurfdiffError(f"sbatch refused the {kind} job: {failure_line(exc)}") from None
    print(f"submitted Slurm job {job.job_id} ({kind}); log: {job.paths.stdout}", flush=True)
    if args.no_wait:
        return 0
    try:
        job.result()
    except KeyboardInterrupt:
        print(f"Slurm job {job.job_id} goes on without this command (squeue -j {job.job_id}; scancel {job.job_id} "
              f"stops it)", file=sys.stderr)
        raise
    except Exception as exc:  # noqa: BLE001 - the job's own error, one line; its log has the rest
        print(f"Slurm job {job.job_id} failed: {failure_line(exc)}", file=sys.stderr)
        return 1
    print(f"Slurm job {job.job_id} finished; log: {job.paths.stdout}")
    return 0
