"""``distill registry``: list, compare, promote and serve registered generators."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from distill_common import promotion, tracking
from distill_common.config import TRACKING_URI_HELP  # one text for every command's --tracking-uri
from distill_common.errors import DistillError

app = typer.Typer(help="MLflow model-registry helpers: list, compare, promote, serve, relog.", no_args_is_help=True)


def _console() -> Console:
    """A console per call, so the width follows the terminal (and test runners' COLUMNS)."""
    return Console()


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def tracking_uri_option() -> Any:
    return typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help=TRACKING_URI_HELP,
                        show_envvar=False)


def use_tracking_uri(uri: str | None) -> None:
    """Point this process (and the servers it starts) at ``uri``; None keeps MLFLOW_TRACKING_URI or ./mlflow.db."""
    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri


def describe_protocol(protocol: dict[str, Any] | None) -> str:
    """A protocol in a few words: "360 vs 1,000 cifar10-train, bf16 features"."""
    if not protocol:
        return "not evaluated"
    gen, ref = protocol.get("generated_n"), protocol.get("reference_n")
    n = f"{gen:,}" if isinstance(gen, int) else "?"
    r = f"{ref:,}" if isinstance(ref, int) else "all"
    return f"{n} vs {r} {protocol.get('reference_set', '?')}, {protocol.get('feature_precision', 'fp32')} features"


def version_summary(v: tracking.ModelVersionInfo) -> str:
    """What a version is: its recipe (or role) and step count, e.g. "progressive, 4 steps"."""
    what = v.tags.get("recipe") or v.tags.get("role") or "model"
    steps = v.tags.get("steps")
    return f"{what}, {steps} steps" if steps else what


@app.command("list")
def list_cmd(tracking_uri: str | None = tracking_uri_option()) -> None:
    """Registered models and their versions: recipe and steps, aliases, FID and ms per image at each evaluated
    step count, and the protocol they were measured under."""
    use_tracking_uri(tracking_uri)
    console = _console()
    table = Table(title=f"registry at {tracking.tracking_uri()}", box=None, padding=(0, 1, 0, 0),
                  header_style="bold underline")
    for col in ("model", "version", "what", "FID / ms per image"):
        table.add_column(col)
    protocols: dict[str, list[str]] = {}
    for name in tracking.list_models():
        for v in tracking.list_versions(name):
            evals = promotion.step_metrics(v)
            summary = ", ".join(f"{s} step{'' if s == 1 else 's'}: {_fmt(m.get('fid'))} / {_fmt(m.get('ms_per_image'))}"
                                for s, m in sorted(evals.items()))
            aliases = "".join(f" @{a}" for a in v.aliases)
            table.add_row(name, f"v{v.version}{aliases}", version_summary(v), summary or "not evaluated")
            try:
                proto = describe_protocol(promotion.read_protocol(v))
            except DistillError:
                proto = "protocol unreadable"
            if evals:
                protocols.setdefault(proto, []).append(f"{name} v{v.version}")
    console.print(table)
    for proto, members in protocols.items():
        console.print(f"protocol {proto}: {', '.join(members)}", highlight=False)


@app.command("compare")
def compare_cmd(
    name: str = typer.Argument(..., help="Registered model name."),
    versions: list[str] = typer.Argument(None, help="Versions to compare (default: all)."),
    tracking_uri: str | None = tracking_uri_option(),
) -> None:
    """Side-by-side table of evaluated versions (recipe, steps, metrics), with the protocol and the MLflow UI link."""
    from distill_common.errors import unknown_choice

    use_tracking_uri(tracking_uri)
    every = tracking.list_versions(name)
    if not every:
        raise unknown_choice("registered model", name, tracking.list_models())
    missing = [v for v in versions or [] if v not in {x.version for x in every}]
    if missing:
        raise unknown_choice(f"version of {name!r}", missing[0], [x.version for x in every])
    infos = [v for v in every if not versions or v.version in versions]
    table = Table(title=f"{name}: evaluated versions", box=None, padding=(0, 1, 0, 0), header_style="bold underline")
    for col in ("version", "what", "steps", "FID", "KID", "CLIP", "LPIPS", "ms/img", "params"):
        table.add_column(col, justify="left" if col in ("version", "what") else "right")
    for v in infos:
        aliases = "".join(f" @{a}" for a in v.aliases)
        for steps, m in sorted(promotion.step_metrics(v).items()) or [(None, {})]:
            table.add_row(f"v{v.version}{aliases}", version_summary(v), _fmt(steps), _fmt(m.get("fid")),
                          _fmt(m.get("kid")), _fmt(m.get("clip_score")), _fmt(m.get("lpips_to_teacher")),
                          _fmt(m.get("ms_per_image")), v.tags.get("params", "n/a"))
    _console().print(table)
    groups, unreadable = promotion.protocol_groups(infos)
    for p, members in groups.items():
        _console().print(f"protocol ({', '.join(members)}): {describe_protocol(json.loads(p))}; {p}",
                         highlight=False, soft_wrap=True)
    for member in unreadable:
        _console().print(f"{member}: protocol unreadable (malformed eval.protocol tag; re-evaluate it)", highlight=False)
    if len(groups) > 1:
        parsed = [json.loads(p) for p in groups]
        _console().print("[yellow]warning:[/] these versions were evaluated under different protocols "
                         f"(differing fields: {promotion.protocol_difference(parsed[0], parsed[1])}): "
                         "their FIDs are not comparable", soft_wrap=True)
    _console().print(f"MLflow UI: {ui_hint()}", highlight=False)


def ui_hint() -> str:
    uri = tracking.tracking_uri()
    if tracking.is_remote(uri):
        return f"{uri}/#/models"
    return f"{mlflow_executable()} ui --backend-store-uri {uri} --port 5000   (then open http://127.0.0.1:5000/#/models)"


def mlflow_executable() -> str:
    """``mlflow`` when it is on PATH, else the one installed beside this Python (``.venv/bin/mlflow``), so the
    printed command runs in a shell where the environment is not activated."""
    import shutil
    import sys

    if shutil.which("mlflow"):
        return "mlflow"
    exe = Path(sys.executable).parent / "mlflow"
    if not exe.exists():
        return "mlflow"
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


@app.command("promote")
def promote_cmd(
    name: str = typer.Argument(..., help="Registered model name."),
    metric: str = typer.Option("fid", "--metric", help="Metric to rank by (fid, kid, lpips_to_teacher: lower is "
                               "better; clip_score, class_accuracy: higher)."),
    max_steps: int = typer.Option(4, "--max-steps", help="Only step counts up to this pass the gate."),
    max_latency_ms: float = typer.Option(None, "--max-latency-ms", help="Only configurations at most this slow pass."),
    min_improvement: float = typer.Option(0.0, "--min-improvement",
                                          help="Required gain over the current champion, in metric units (the "
                                               "rule when either lacks a 95% interval; with intervals, they must "
                                               "not overlap as well)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the decision only."),
    tracking_uri: str | None = tracking_uri_option(),
) -> None:
    """Move the champion alias to the best gated version when it beats the current champion (non-overlapping
    95% intervals when both carry them, else --min-improvement)."""
    use_tracking_uri(tracking_uri)
    decision = promotion.decide(name, metric, max_steps=max_steps, max_latency_ms=max_latency_ms,
                                min_improvement=min_improvement)
    table = Table(title=f"{name}: candidates ({metric}, steps <= {max_steps})")
    for col in ("version", "steps", metric, "95% interval", "ms/image"):
        table.add_column(col, justify="right")
    for c in decision.considered:
        ci = f"[{c.ci95[0]:.4g}, {c.ci95[1]:.4g}]" if c.ci95 else "n/a"
        table.add_row(c.version, str(c.steps), _fmt(c.value), ci, _fmt(c.ms_per_image))
    _console().print(table)
    verb = "would promote" if dry_run else "promoted"
    if decision.promote:
        if not dry_run:
            promotion.apply(decision)
        _console().print(f"{verb} v{decision.chosen.version} to champion: {decision.reason}")
    else:
        _console().print(f"champion unchanged: {decision.reason}")


@app.command("relog")
def relog_cmd(path: Path = typer.Argument(..., help="An unlogged_metrics.jsonl file written during an outage.")) -> None:
    """Re-send metrics, params and artifacts that could not be logged while the tracking server was down.

    Lists every record it could not send, with the reason, and exits 1 when any was dropped; those records
    stay in the file for another try, the sent ones (and their kept artifact copies) are removed."""
    report = tracking.relog(path)
    console = _console()
    console.print(f"re-logged {report.sent} record(s) from {path} to {tracking.tracking_uri()}", highlight=False,
                  soft_wrap=True)
    if not report.dropped:
        console.print(f"all sent; removed {path} and the artifact copies kept for it", highlight=False, soft_wrap=True)
        return
    table = Table(title=f"{len(report.dropped)} record(s) NOT sent (kept in {path} for another relog)")
    for col in ("line", "what", "why"):
        table.add_column(col)
    for lineno, what, why in report.dropped:
        table.add_row(str(lineno), what, why)
    console.print(table)
    raise typer.Exit(1)


@app.command("serve")
def serve_cmd(
    model: str = typer.Argument(..., help="NAME@ALIAS or NAME/VERSION of a registered generator."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (loopback by default)."),
    port: int = typer.Option(5001, "--port", help="Port of the REST endpoint."),
    max_steps: int = typer.Option(200, "--max-steps", help="Most sampling steps one request may ask for (1-10000); "
                                  "a request over it gets a one-line 400 at once."),
    max_rows: int = typer.Option(64, "--max-rows", help="Most rows (images) in one request (1-10000); a request "
                                 "over it gets a one-line 400 at once."),
    request_timeout: float = typer.Option(60.0, "--request-timeout", help="Seconds one request may run (1-86400); "
                                          "past it the request is cancelled (503) and its sampling stops."),
    tracking_uri: str | None = tracking_uri_option(),
) -> None:
    """Serve a registered generator over REST, in MLflow's scoring format: POST /invocations returns base64 PNGs.

    Only generators logged by a distill command are served: the model is downloaded and its files checked
    before the server starts (a foreign pyfunc, e.g. a pickled one, is refused unloaded). A request whose client
    disconnects, or that runs past --request-timeout, is cancelled: its sampling stops within one network
    forward. SIGTERM/SIGINT cancel the requests in flight and stop the server and everything it started."""
    from distill_common.errors import ConfigError
    from distill_common.foreground import run_foreground

    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a TCP port; pass a number from 1 to 65535 (default 5001)")
    for flag, value in (("--max-steps", max_steps), ("--max-rows", max_rows)):
        if not 1 <= value <= 10_000:
            raise ConfigError(f"{flag} must be in [1, 10000], got {value}; pass e.g. {flag} 64")
    if not 1 <= request_timeout <= 86_400:  # NaN fails too
        raise ConfigError(f"--request-timeout must be in [1, 86400] seconds, got {request_timeout}; pass e.g. "
                          "--request-timeout 60")
    from distill_common.foreground import check_port_free

    check_port_free(host, port)
    use_tracking_uri(tracking_uri)
    uri = model if model.startswith("models:/") else f"models:/{model}"
    tracking.require_store()
    tracking.configure()
    staging = Path(tempfile.mkdtemp(prefix="distill-serve-"))
    try:
        local = tracking.fetch_servable_model(uri, staging / "model")
        from distill_common.serving import REQUEST_TIMEOUT_ENV

        env = dict(os.environ, MLFLOW_TRACKING_URI=tracking.tracking_uri(), MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false",
                   DISTILL_SERVE_MAX_STEPS=str(max_steps), DISTILL_SERVE_MAX_ROWS=str(max_rows),
                   **{REQUEST_TIMEOUT_ENV: repr(float(request_timeout))})
        # distill's own server (MLflow's routes and formats, cancellable requests), loading the checked files
        cmd = [sys.executable, "-m", "distill_common.serving", str(local), host, str(port)]
        _console().print(f"serving {uri} on http://{host}:{port}/invocations", highlight=False)
        rc = run_foreground(cmd, env)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    raise typer.Exit(rc)
