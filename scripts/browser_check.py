"""Look at an MLflow store as a person would: start `mlflow ui` on it, open the experiment, a
run and the registered model in headless Chromium, save screenshots and the rendered pages'
text, and check what a person needs to see there.

    python scripts/browser_check.py --store runs/mlflow.db --experiment prunepipe-demo \\
        --model demo-resnet18-digits --out runs/browser-check

Exit status 0: every check passed; 1: a check failed (listed); 3: Chromium is not installed
(Debian: ``apt-get install chromium``). The checks read the pages' DOM text as Chromium
rendered it (``--dump-dom``), so they see what the React UI drew, not what the server sent.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
NO_CHROMIUM = 3


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium(binary: str, url: str, out: Path, budget_ms: int) -> str:
    """Screenshot ``url`` into ``out`` and return its rendered DOM."""
    common = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
              f"--virtual-time-budget={budget_ms}"]
    subprocess.run([*common, f"--screenshot={out}", url], capture_output=True, timeout=180, check=False)
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=False)
    out.with_suffix(".html").write_text(dom.stdout)
    return dom.stdout


def _wait_up(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {seconds:.0f} s")


def check(store: str, experiment: str, model: str, out: Path, budget_ms: int = 20000) -> list[str]:
    """Run the checks; returns the failures (empty: all passed)."""
    from mlflow.tracking import MlflowClient

    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("Chromium is not installed (Debian: apt-get install chromium)")
    uri = store if "://" in store else f"sqlite:///{Path(store).resolve()}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return [f"experiment {experiment!r} not found in {uri}"]
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    trial = next((r for r in runs if r.data.tags.get("mlflow.parentRunId")), runs[0] if runs else None)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    ui = subprocess.Popen([mlflow_bin, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
                          stdout=open(out / "mlflow-ui.log", "w"), stderr=subprocess.STDOUT)
    failures: list[str] = []
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_up(base + "/health", 120)
        pages = {"experiment": f"{base}/#/experiments/{exp.experiment_id}/runs",
                 "model": f"{base}/#/models/{model}"}
        if trial is not None:
            pages["run"] = f"{base}/#/experiments/{exp.experiment_id}/runs/{trial.info.run_id}"
        doms = {name: _chromium(binary, url, out / f"{name}.png", budget_ms) for name, url in pages.items()}
        names = [r.info.run_name for r in runs]
        if not any(n and n in doms["experiment"] for n in names):
            failures.append("experiment page: no run name visible")
        if any(n and n.startswith("_trial_driver") for n in names):
            failures.append("runs named after Ray's trial ids")
        if "Traces" in doms["experiment"] and "Overview" in doms["experiment"] and "Runs" not in doms["experiment"]:
            failures.append("experiment opens on the GenAI traces overview")
        if any(r.info.status == "RUNNING" for r in runs):
            failures.append(f"{sum(r.info.status == 'RUNNING' for r in runs)} runs still RUNNING")
        if trial is not None and not trial.inputs.dataset_inputs:
            failures.append("trial run without a dataset input")
        if "Version" not in doms["model"]:
            failures.append("registered model page shows no version")
        (out / "findings.txt").write_text("\n".join(failures or ["all checks passed"]) + "\n")
    finally:
        ui.terminate()
        try:
            ui.wait(timeout=20)
        except subprocess.TimeoutExpired:
            ui.kill()
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="an MLflow tracking URI, or a SQLite file")
    p.add_argument("--experiment", required=True)
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--out", type=Path, default=Path("browser-check"), help="screenshots and rendered pages")
    p.add_argument("--budget-ms", type=int, default=20000, help="Chromium's virtual time budget per page")
    args = p.parse_args(argv)
    try:
        failures = check(args.store, args.experiment, args.model, args.out, args.budget_ms)
    except FileNotFoundError as err:
        print(f"browser_check: {err}", file=sys.stderr)
        return NO_CHROMIUM
    for f in failures:
        print(f"FAIL {f}")
    print(f"screenshots: {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
