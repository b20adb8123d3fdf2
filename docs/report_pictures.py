"""Draw the documentation's pictures of reports, from real runs' stores.

    dpobench run --variants dpo,ipo,simpo,hinge,robust_dpo,sppo_hard,cal_dpo --betas 0.05,0.1,0.5,1 --out readme-run
    python docs/report_pictures.py figures readme-run        # docs/frontier.png, docs/beta_sensitivity.png

    dpobench run --preset rlhf --out rlhf-run
    python docs/report_pictures.py rlhf rlhf-run             # docs/rlhf.png: DPO vs RLHF, the README's figure

    dpobench run                                             # the default run, into dpobench-results
    python docs/report_pictures.py screenshots dpobench-results
    # docs/report-first-screen.png (report.html at 1400 × 900 in headless Chromium), docs/report-first-page.png
    # (report.pdf's first page, by poppler's pdftoppm)

The figures are the report's own (``dpobench.report.build_report``), saved as PNG at 110 dpi; the screenshots are
of the report files as ``dpobench report`` writes them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from dpobench.report import build_report, write_report

DOCS = Path(__file__).parent
#: Chromium's flags for a headless screenshot on a machine with no network and no display
CHROMIUM = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def figures(store: str) -> None:
    sections = {s.id: s for s in build_report(store).sections}
    sections["frontier"].figures[0].savefig(DOCS / "frontier.png", dpi=110)
    sections["beta"].figures[0].savefig(DOCS / "beta_sensitivity.png", dpi=110)


def rlhf(store: str) -> None:
    sections = {s.id: s for s in build_report(store).sections}
    sections["rlhf"].figures[0].savefig(DOCS / "rlhf.png", dpi=110)


def screenshots(store: str) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None or shutil.which("pdftoppm") is None:
        sys.exit("needs Chromium and poppler's pdftoppm (Debian: apt-get install chromium poppler-utils)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_report(store, folder)
        subprocess.run([browser, *CHROMIUM, f"--user-data-dir={folder / 'profile'}", "--window-size=1400,900",
                        f"--screenshot={DOCS / 'report-first-screen.png'}", (folder / "report.html").as_uri()],
                       check=True, capture_output=True, timeout=120)  # fmt: skip
        subprocess.run(["pdftoppm", "-f", "1", "-l", "1", "-r", "110", "-png", "-singlefile",
                        str(folder / "report.pdf"), str(DOCS / "report-first-page")], check=True)  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("figures", "rlhf", "screenshots"):
        sys.exit("usage: python docs/report_pictures.py figures|rlhf|screenshots STORE")
    {"figures": figures, "rlhf": rlhf, "screenshots": screenshots}[sys.argv[1]](sys.argv[2])
