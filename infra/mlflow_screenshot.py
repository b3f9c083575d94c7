"""Screenshots of an MLflow run as a user sees it in the UI, taken with headless Chromium:
the run's overview (parameters, metrics) and its video artifact.

    python infra/mlflow_screenshot.py --tracking-uri http://127.0.0.1:5000 --run RUN_ID --out shots/

Writes OUT/run.png and OUT/video.png (the first GIF under videos/), and OUT/run.html, the page
as rendered (to check what it shows without looking). Needs Debian's `chromium` (installed by
infra/setup.sh) and a tracking server (infra/local_cluster.sh starts one); no other packages.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path


def rest(uri: str, endpoint: str, **params) -> dict:
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def chromium(*args: str) -> subprocess.CompletedProcess:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: install Debian's chromium (bash infra/setup.sh does)")
    # The UI is a single-page app: virtual time lets its scripts fetch and render before the shot.
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1600,1100", "--virtual-time-budget=20000", *args],
                          capture_output=True, text=True, timeout=180)


def screenshot(url: str, out: Path) -> Path:
    result = chromium(f"--screenshot={out}", url)
    if not out.exists():
        raise SystemExit(f"chromium took no screenshot of {url}:\n{result.stderr[-2000:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python infra/mlflow_screenshot.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", required=True, help="the MLflow server, e.g. http://127.0.0.1:5000")
    parser.add_argument("--run", required=True, help="MLflow run id")
    parser.add_argument("--out", type=Path, default=Path("screenshots"), help="folder for the PNGs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    run = rest(args.tracking_uri, "runs/get", run_id=args.run)["run"]
    experiment = run["info"]["experiment_id"]
    # The UI opens in its GenAI view unless told (or a user switched it): kpscale's runs are training runs.
    page = f"{args.tracking_uri.rstrip('/')}/#/experiments/{experiment}/runs/{args.run}"
    view = "?workflowType=machine_learning"
    (args.out / "run.html").write_text(chromium("--dump-dom", page + view).stdout)
    shots = [screenshot(page + view, args.out / "run.png")]
    videos = [f["path"] for f in rest(args.tracking_uri, "artifacts/list", run_id=args.run, path="videos").get("files", [])
              if f["path"].endswith(".gif")]
    if videos:
        shots.append(screenshot(f"{page}/artifacts/{videos[0]}{view}", args.out / "video.png"))
    else:
        print(f"run {args.run} has no GIF under videos/: no video screenshot", file=sys.stderr)
    for shot in shots:
        print(shot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
