"""The README's pictures from a real `surfdiff run`: its phase diagram and the key lines it printed.

    .venv/bin/surfdiff run configs/demo.yaml | tee /tmp/demo.log
    .venv/bin/python docs/readme_images.py /tmp/demo.log data/figures/demo-ag111-o-emt

writes docs/images/demo-phase-diagram.png (copied) and docs/images/demo-summary.png (the lines from
"=== surfdiff discovery finished ===" on, as a terminal would show them).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
from pathlib import Path

OUT = Path(__file__).resolve().parent / "images"


def summary_lines(log: str) -> list[str]:
    text = log.split("=== surfdiff discovery finished ===", 1)
    if len(text) != 2:
        raise SystemExit("readme_images: the log holds no finished `surfdiff run` (no '=== surfdiff discovery "
                         "finished ===' line)")
    keep = [line for line in text[1].strip().splitlines() if not line.startswith("  surfdiff query")]
    keep = [line for line in keep if not line.startswith("query them with")]
    return [w for line in keep for w in (textwrap.wrap(line, 110, subsequent_indent="    ") or [""])]


def render(lines: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = 0.22 * (len(lines) + 2)
    fig = plt.figure(figsize=(10.5, height), dpi=110)
    fig.patch.set_facecolor("#1e1e1e")
    fig.text(0.01, 1 - 0.6 / (len(lines) + 2), "$ surfdiff run configs/demo.yaml   (…)", family="monospace",
             fontsize=8.5, color="#8fbcbb", va="top")
    for i, line in enumerate(lines):
        color = "#e5c07b" if line.startswith("warning") else "#d8dee9"
        fig.text(0.01, 1 - (i + 1.6) / (len(lines) + 2), line, family="monospace", fontsize=8.5, color=color,
                 va="top")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, facecolor=fig.get_facecolor())
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log", help="stdout of `surfdiff run configs/demo.yaml`")
    p.add_argument("figures", help="the run's figure folder (data/figures/<study>)")
    a = p.parse_args()
    phase = Path(a.figures) / "evaluation" / "phase-diagram.png"
    if not phase.is_file():
        raise SystemExit(f"readme_images: no phase diagram at {phase}")
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(phase, OUT / "demo-phase-diagram.png")
    render(summary_lines(Path(a.log).read_text()), OUT / "demo-summary.png")
    print(f"wrote {OUT / 'demo-phase-diagram.png'} and {OUT / 'demo-summary.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
