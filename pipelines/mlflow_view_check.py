"""Which MLflow UI view do our experiments open in? A check with a real browser.

`.venv/bin/python pipelines/mlflow_view_check.py [out=docs/img/mlflow_view.png]`

Starts ``mlflow ui`` on a free localhost port over a temporary store holding one tiny run
(logged through :class:`dreamer_trl.tracking.Tracker`, so its experiment carries the
``mlflow.experimentKind=custom_model_development`` tag Tracker sets), opens the experiment in
headless Chromium and

* saves a screenshot of the experiment's model-training link (``?workflowType=machine_learning``)
  to ``out`` and one of its plain link to ``<out stem>_default.png``;
* reads each page's heading from Chromium's DOM dump and prints which view it opened:
  ``Runs`` is the model-training (runs / charts) view, ``Overview`` or ``Traces`` GenAI's.

Why both links: MLflow 3.x UIs without the sidebar's "GenAI | Model training" switch choose
the view from the experiment's kind tag; MLflow 3.17's UI has the switch, and the switch (the
browser's saved choice, GenAI until the user picks "Model training" once, or the link's
``workflowType``) decides, whatever the tag says. This script shows which applies to the
installed MLflow.

Needs Chromium (Debian: ``apt-get install -y chromium``; ``chromium=<path>`` for another).
Exit status 0 when the model-training link opened the runs view, 1 otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.common import ConfigError, key_values, run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = {"out": str(ROOT / "docs" / "img" / "mlflow_view.png"), "chromium": "chromium"}
TRAINING_VIEW = "workflowType=machine_learning"  # the UI's own URL parameter for its switch
# The flags a headless screenshot needs on a bare server; no network beyond localhost.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # running as root in a container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
    "--virtual-time-budget=15000",  # let the single-page app fetch and render (15 s virtual)
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_store(root: Path) -> tuple[str, str, str]:
    """A sqlite store with one finished run of a few metrics: (uri, experiment id, run id)."""
    from dreamer_trl.tracking import Tracker

    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker("mlflow-view-check", run_name="tiny", tracking_uri=uri)
    tracker.log_params({"env": {"name": "cartpole"}, "seed": 0})
    for step in range(0, 101, 10):
        tracker.log_metrics({"train/loss": 1.0 / (1 + step), "eval/return": 2.0 * step}, step)
    tracker.close("FINISHED")
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=uri).get_run(tracker.run_id)
    return uri, run.info.experiment_id, tracker.run_id


def start_ui(uri: str, port: int, log: Path) -> subprocess.Popen:
    """``mlflow ui`` in its own process group (it starts workers: stop them all together)."""
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow ui exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop_ui(proc)
    raise RuntimeError(f"mlflow ui did not answer on port {port} within 120 s")


def stop_ui(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def chromium(binary: str, url: str, *action: str) -> str:
    """Run headless Chromium on ``url`` with a fresh profile (no saved view choice)."""
    with tempfile.TemporaryDirectory(prefix="chromium_profile_") as profile:
        proc = subprocess.run(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *action, url],
            capture_output=True,
            text=True,
            timeout=180,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def heading(binary: str, url: str) -> str:
    """The page's first <h2>: the experiment page's title names its view."""
    match = re.search(r"<h2[^>]*>([^<]+)<", chromium(binary, url, "--dump-dom"))
    return match[1].strip() if match else "(no heading)"


def main(argv: list[str]) -> int:
    opts = key_values(argv, DEFAULTS)
    binary = shutil.which(opts["chromium"])
    if binary is None:
        raise ConfigError(
            f"no {opts['chromium']!r} browser on PATH (Debian: apt-get install -y chromium)"
        )
    out = Path(opts["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    default_png = out.with_name(f"{out.stem}_default{out.suffix}")
    with tempfile.TemporaryDirectory(prefix="mlflow_view_") as tmp:
        uri, exp_id, _ = tiny_store(Path(tmp))
        port = free_port()
        ui = start_ui(uri, port, Path(tmp) / "ui.log")
        try:
            plain = f"http://127.0.0.1:{port}/#/experiments/{exp_id}"
            training = f"{plain}?{TRAINING_VIEW}"
            views = {}
            for url, png in ((training, out), (plain, default_png)):
                chromium(binary, url, f"--screenshot={png.resolve()}")
                views[url] = heading(binary, url)
                print(f"{views[url]!r:>12} view <- {url.replace(str(port), 'PORT')} ({png})")
        finally:
            stop_ui(ui)
    ok = views[training] == "Runs"
    print(
        "model-training link opens the runs view" if ok else "model-training link did NOT "
        f"open the runs view (heading {views[training]!r})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
