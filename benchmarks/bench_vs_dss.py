"""Side by side, in one run: surfdiff's guided sampling against the paper authors' own sampler, dss
(github.com/nronne/dss), both on CPU at the same batch size, number of reverse-diffusion steps and threads.

What it measures, per run (each run is its own process, so its peak RSS is its own):
- dss: `dss.helpers.sample` with their Ag–O checkpoint (`AgO/model.ckpt` of nronne/surface-diffusion-model-data,
  loaded into `get_diffusion_model(cutoff=6.0, beta_max=2.0)` as their `AgO/ht_script.py` does), force-field
  guidance on (`regressor_guidance_sample`, eta=1e-4 as in their Ag–O script, no post-relaxation), template with
  pbc on all axes as in their scripts. Timed: the reverse-diffusion loop only (from the end of the random
  initial positions to the end of the last step's wrap), after a 2-step warm-up at the same batch.
- surfdiff: `benchmarks/bench_sampling.py --one BATCH 1` in `.venv` (paper-size PaiNN with random weights,
  score + MLFF forces from one shared representation, timed after a 1-step warm-up).
Both sample the same system: Ag12O6 on a 3-layer p(4×4) Ag(111) slab, a = 4.09 Å (66 atoms, 18 of them
moving), confinement box 0.5–5.5 Å above the top layer; the dss template is built by surfdiff's own
`build_system` so the atoms, cell and box are identical. Rate: structure-steps/s = batch × steps / loop time.
Runs alternate dss, surfdiff, dss, surfdiff, ... (`--repeats` rounds) so drift in machine load hits both.

    git clone /work/.mirror/nronne+dss/repo benchmarks/.dss/src      # `fetch github:nronne/dss`
    git clone /work/.mirror/nronne+surface-diffusion-model-data/repo benchmarks/.dss/data
    python3 benchmarks/bench_vs_dss.py --dss benchmarks/.dss/src --checkpoint benchmarks/.dss/data/AgO/model.ckpt \
        --batch 64 --steps 50 --threads 2 --repeats 2 [--json out.json]

dss gets its own virtual environment, `benchmarks/.dss/venv` (git-ignored, created on first use, a few
minutes): torch==2.13.0 first (the wheel on this machine's disk, as scripts/setup.sh does for .venv), then
torch constrained through PIP_CONSTRAINT for every later pip call, then dss from the local checkout with
schnetpack==2.0.4 (dss pins no versions; 2.0.4 is the schnetpack of the checkpoint's time, Lightning 2.1.2, and
the one whose PaiNN the checkpoint's state dict loads into strictly). dss itself asks for an unpinned torch, so
nothing is installed with --no-deps. Its driver is written to `benchmarks/.dss/dss_driver.py` (also ignored):
no dss code is copied into this repository. dss's `sample` hard-codes device='cuda' for its AtomsConverter;
the driver swaps in a CPU one.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".dss"
VENV = WORK / "venv"
OUR_PY = ROOT / ".venv" / "bin" / "python"
TORCH = "torch==2.13.0"
SCHNETPACK = "schnetpack==2.0.4"
TARGET = 20.0  # issue 28: surfdiff guided ≥ 20× dss at batch 64, 2 threads
SYSTEM = {"cell": "p(4x4)", "composition": "Ag12O6", "element": "Ag", "lattice_constant": 4.09, "layers": 3}

# schnetpack (2.0.4 and 2.1.1 alike) imports the TypeVar `T_co` from torch.utils.data.dataloader, which torch
# has since renamed `_T_co`: put the old name back before schnetpack is imported (typing only, no behaviour).
SHIM = """
import torch.utils.data.dataloader as _dl
if not hasattr(_dl, "T_co"):
    _dl.T_co = _dl._T_co
"""

# Runs in dss's venv. Drives the installed dss; times the reverse-diffusion loop of its guided sampler.
DRIVER = r"""
import json, resource, sys, time
import numpy as np
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
""" + SHIM + r"""
import schnetpack.interfaces as spi
from ase import Atoms
from dss.helpers import get_diffusion_model, sample

class CPUAtomsConverter(spi.AtomsConverter):  # dss.helpers.sample hard-codes device='cuda'
    def __init__(self, *a, **k):
        k["device"] = "cpu"
        super().__init__(*a, **k)

spi.AtomsConverter = CPUAtomsConverter
model, _ = get_diffusion_model(cutoff=6.0, beta_max=2.0)  # as their AgO/ht_script.py
ckpt = torch.load(args["checkpoint"], map_location="cpu", weights_only=False)
model.load_state_dict(ckpt["state_dict"])  # strict: the checkpoint must fit this dss + schnetpack
model.to("cpu").eval()
model.verbose = False
t = args["template"]
template = Atoms(numbers=t["numbers"], positions=t["positions"], cell=t["cell"])
template.set_pbc([True, True, True])  # as their scripts
z_confinement = torch.tensor(np.array(t["z_box"]))
marks = {}
_rand, _wrap = model.batch_random_positions, model.batch_wrap

def rand(batch):
    out = _rand(batch)
    marks["start"] = time.perf_counter()
    return out

def wrap(batch):
    out = _wrap(batch)
    marks["end"] = time.perf_counter()
    return out

model.batch_random_positions, model.batch_wrap = rand, wrap
torch.manual_seed(0)
kw = dict(eta=1e-4, postrelax_steps=0)  # eta as their Ag-O script; > 0 switches guidance on
sample(model, args["batch"], template, list(t["symbols"]), z_confinement, num_steps=2, **kw)  # warm-up
t0 = time.perf_counter()
atoms = sample(model, args["batch"], template, list(t["symbols"]), z_confinement, num_steps=args["steps"], **kw)
call = time.perf_counter() - t0
loop = marks["end"] - marks["start"]
n = args["batch"] * args["steps"]
print(json.dumps({"batch": args["batch"], "steps": args["steps"], "atoms": len(atoms[0]),
                  "moving_atoms": len(t["symbols"]), "structures_out": len(atoms),
                  "structure_steps_per_s": n / loop, "whole_call_structure_steps_per_s": n / call,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "torch": torch.__version__}))
"""

TEMPLATE = r"""
import json, sys
from surfdiff_core.config import config_from_dict
from surfdiff_core.system import build_system
s = json.loads(sys.argv[1])
cfg = config_from_dict({"substrate": {"element": s["element"], "lattice_constant": s["lattice_constant"],
                                      "layers": s["layers"]}})
system = build_system(cfg.substrate, cfg.confinement, s["cell"], s["composition"])
t = system.template
print(json.dumps({"numbers": t.numbers.tolist(), "positions": t.positions.tolist(), "cell": t.cell.tolist(),
                  "z_box": list(system.z_box), "symbols": list(system.overlayer), "n_atoms": system.n_atoms}))
"""


class BenchError(Exception):
    """One line for stderr; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run(cmd: list[str], what: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if p.returncode != 0:
        raise BenchError(f"{what} failed (exit {p.returncode}): {last_line(p.stderr or p.stdout)}")
    return p.stdout


def source_stamp(dss: Path) -> str:
    h = hashlib.sha1(f"{TORCH} {SCHNETPACK}".encode())
    for f in sorted([dss / "setup.py", *dss.glob("dss/**/*.py")]):
        h.update(f.relative_to(dss).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:12]


def ensure_venv(dss: Path, python: str) -> Path:
    """dss and its dependencies in benchmarks/.dss/venv; reinstalled when the dss checkout changes."""
    py = VENV / "bin" / "python"
    stamp = VENV / f".dss-installed-{source_stamp(dss)}"
    if not stamp.exists():
        print(f"[dss venv] installing dss from {dss} into {VENV} (first time: a few minutes)", file=sys.stderr)
        if not py.exists():
            run([python, "-m", "venv", str(VENV)], "creating the dss venv")
        pip = [str(py), "-m", "pip", "install", "-q"]
        run(pip + ["--upgrade", "pip", "wheel", "setuptools"], "pip install pip wheel setuptools")
        if subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode != 0:
            run(pip + [TORCH], f"pip install {TORCH}")
        version = run([str(py), "-c", "import torch; print(torch.__version__.split('+')[0])"], "torch").strip()
        constraints = VENV / "constraints.txt"
        constraints.write_text(f"torch=={version}\n")
        env = dict(os.environ, PIP_CONSTRAINT=str(constraints))
        run(pip + [SCHNETPACK, str(dss)], "pip install dss (with schnetpack)", env=env)
        run(pip + ["--no-deps", "--force-reinstall", str(dss)], "pip install dss", env=env)  # this checkout
        for old in VENV.glob(".dss-installed-*"):
            old.unlink()
        stamp.touch()
    p = subprocess.run([str(py), "-c", SHIM + "import dss.helpers, schnetpack"], capture_output=True, text=True)
    if p.returncode != 0:
        raise BenchError(f"dss is not importable in {VENV}: {last_line(p.stderr)}", code=2)
    return py


def template() -> dict:
    out = run([str(OUR_PY), "-c", TEMPLATE, json.dumps(SYSTEM)], "building the Ag-O system with surfdiff", cwd=ROOT)
    return json.loads(last_line(out))


def run_dss(py: Path, checkpoint: Path, tmpl: dict, batch: int, steps: int, threads: int) -> dict:
    driver = WORK / "dss_driver.py"
    driver.write_text(DRIVER)
    args = {"checkpoint": str(checkpoint), "template": tmpl, "batch": batch, "steps": steps, "threads": threads}
    out = run([str(py), str(driver), json.dumps(args)], "dss sampling", env=thread_env(threads), cwd=WORK)
    return json.loads(last_line(out))


def run_surfdiff(batch: int, steps: int, threads: int) -> dict:
    cmd = [str(OUR_PY), str(ROOT / "benchmarks" / "bench_sampling.py"), "--one", str(batch), "1",
           "--steps", str(steps), "--threads", str(threads)]
    out = run(cmd, "surfdiff sampling (bench_sampling.py --one)", env=thread_env(threads), cwd=ROOT)
    return json.loads(last_line(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dss", type=Path, required=True, help="local checkout of github.com/nronne/dss")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="dss's Ag-O checkpoint (AgO/model.ckpt of nronne/surface-diffusion-model-data)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, help="save the numbers here")
    p.add_argument("--python", default=shutil.which("python3.11") or sys.executable,
                   help="interpreter for the dss venv (default python3.11, as .venv)")
    args = p.parse_args(argv)
    try:
        dss = args.dss.resolve()
        if not (dss / "setup.py").is_file() or not (dss / "dss" / "__init__.py").is_file():
            raise BenchError(f"--dss {args.dss}: not a dss checkout (no setup.py and dss/__init__.py there)", 2)
        if not args.checkpoint.is_file():
            raise BenchError(f"--checkpoint {args.checkpoint}: no such file", 2)
        if min(args.batch, args.steps, args.threads, args.repeats) < 1:
            raise BenchError("--batch, --steps, --threads and --repeats must be at least 1", 2)
        if not OUR_PY.exists():
            raise BenchError(f"{OUR_PY} missing: run scripts/setup.sh first", 2)
        WORK.mkdir(parents=True, exist_ok=True)
        py = ensure_venv(dss, args.python)
        tmpl = template()
        cpu = cpu_model()
        print(f"CPU: {cpu} ({os.cpu_count()} logical CPUs), host {platform.node()}")
        print(f"system: {SYSTEM['composition']} on {SYSTEM['layers']}-layer {SYSTEM['cell']} Ag(111), "
              f"{tmpl['n_atoms']} atoms ({len(tmpl['symbols'])} moving); batch {args.batch}, {args.steps} steps, "
              f"{args.threads} threads, guided")
        print(f"{'round':>5} {'sampler':>8} {'structure-steps/s':>18} {'peak MB':>8} {'load':>5}")
        rounds = []
        for r in range(1, args.repeats + 1):
            d = run_dss(py, args.checkpoint.resolve(), tmpl, args.batch, args.steps, args.threads)
            d["load_after"] = os.getloadavg()[0]
            print(f"{r:5d} {'dss':>8} {d['structure_steps_per_s']:18.2f} {d['peak_mb']:8.0f} {d['load_after']:5.1f}",
                  flush=True)
            s = run_surfdiff(args.batch, args.steps, args.threads)
            s["load_after"] = os.getloadavg()[0]
            print(f"{r:5d} {'surfdiff':>8} {s['structure_steps_per_s']:18.2f} {s['peak_mb']:8.0f} "
                  f"{s['load_after']:5.1f}", flush=True)
            rounds.append({"dss": d, "surfdiff": s})
        med_d = statistics.median(x["dss"]["structure_steps_per_s"] for x in rounds)
        med_s = statistics.median(x["surfdiff"]["structure_steps_per_s"] for x in rounds)
        ratio = med_s / med_d
        meets = ratio >= TARGET
        print(f"median: dss {med_d:.2f}, surfdiff {med_s:.2f} structure-steps/s; surfdiff/dss = {ratio:.1f}x "
              f"({'meets' if meets else 'does NOT meet'} the issue's >= {TARGET:.0f}x)")
        if args.json:
            record = {
                "command": shlex.join([sys.executable, *sys.argv]),
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "host": platform.node(), "cpu": cpu, "cpus": os.cpu_count(),
                "batch": args.batch, "steps": args.steps, "threads": args.threads, "repeats": args.repeats,
                "system": SYSTEM | {"atoms": tmpl["n_atoms"], "z_box": tmpl["z_box"]},
                "rounds": rounds, "median_dss": med_d, "median_surfdiff": med_s, "ratio": ratio,
                "target": TARGET, "meets_target": meets,
            }
            args.json.write_text(json.dumps(record, indent=2) + "\n")
        return 0
    except BenchError as e:
        print(f"bench_vs_dss: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
