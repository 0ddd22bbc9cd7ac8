"""Checks for docker/ci-test.sh, run on the host against a served Mnemo (a container or a local process).

Standard library only (plus the project's own synthetic-data generator for test images), so the stage
needs nothing beyond the project's install. Each subcommand prints what it checked and exits non-zero
with the reason on the first failure.

    python docker/ci_checks.py images OUT
    python docker/ci_checks.py wait URL
    python docker/ci_checks.py score URL IMAGES OUT_JSON [--model brick]
    python docker/ci_checks.py same-scores A_JSON B_JSON
    python docker/ci_checks.py bad-input URL
    python docker/ci_checks.py metrics URL MIN_REQUESTS
    python docker/ci_checks.py prometheus PROM_URL DASHBOARD RULES
    python docker/ci_checks.py failover HOST:PORT HOST:PORT IMAGES --kill 'docker kill NAME'
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

GOOD = "good"
TIMEOUT_S = 30.0


class CheckError(Exception):
    """A failed check; its message is the reason printed by ``main``."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckError(message)


def http(url: str, body: bytes | None = None, content_type: str | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET, or a POST when ``body`` is given; HTTP errors are answers, not raises."""
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


# ------------------------------------------------------------------------------------------- the service


def make_images(out: Path) -> None:
    """Normal and defective brick images like the default bundle's test set, on a seed it never saw."""
    from mnemo.training.synthetic import generate

    generate(out, texture="brick", size=64, n_train=0, n_test_good=8, n_test_defect=2, seed=2024)
    print(f"wrote {len(list(out.glob('test/*/*.png')))} test images under {out}")


def wait_ready(url: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if http(f"{url}/readyz")[0] == 200:
                print(f"{url} is ready")
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise CheckError(f"{url}/readyz was not 200 within {timeout_s:g} s")


def score_one(url: str, model: str, path: Path) -> dict[str, Any]:
    """Score one PNG and check the answer's shape and value ranges."""
    status, body = http(f"{url}/v1/models/{model}:score?heatmap=grid", path.read_bytes(), "image/png")
    expect(status == 200, f"{path.name}: HTTP {status}: {body[:300]!r}")
    answer = json.loads(body)
    expect(answer["model"]["name"] == model, f"answer names model {answer['model']!r}")
    (result,) = answer["results"]
    expect(math.isfinite(result["score"]), f"{path.name}: score {result['score']!r} is not finite")
    expect(0.0 <= result["p_value"] <= 1.0, f"{path.name}: p-value {result['p_value']} outside [0, 1]")
    expected = "anomalous" if result["score"] > result["threshold"] else "ok"
    expect(result["verdict"] == expected, f"{path.name}: verdict {result['verdict']} for {result}")
    grid = result["heatmap"]["values"]
    expect(len(grid) > 1 and len({len(row) for row in grid}) == 1, f"{path.name}: ragged heatmap grid")
    expect(all(math.isfinite(v) for row in grid for v in row), f"{path.name}: non-finite heatmap values")
    return result


def mean_score(results: list[dict[str, Any]]) -> float:
    return sum(r["score"] for r in results) / len(results)


def score_all(url: str, images: Path, out: Path, model: str) -> None:
    """Score the test images; defects must score higher than normal images and mostly be flagged."""
    results = {
        str(p.relative_to(images)): score_one(url, model, p) for p in sorted(images.glob("test/*/*.png"))
    }
    expect(len(results) >= 2, f"no test images under {images}")
    good = [r for name, r in results.items() if name.split("/")[1] == GOOD]
    bad = [r for name, r in results.items() if name.split("/")[1] != GOOD]
    flagged = sum(r["verdict"] == "anomalous" for r in bad) / len(bad)
    passed = sum(r["verdict"] == "ok" for r in good) / len(good)
    print(f"{len(good)} normal: mean score {mean_score(good):.5f}, {passed:.0%} ok; "
          f"{len(bad)} defective: mean score {mean_score(bad):.5f}, {flagged:.0%} anomalous")  # fmt: skip
    expect(mean_score(bad) > mean_score(good), "defective images do not score higher than normal ones")
    expect(flagged >= 0.6 and passed >= 0.6, "verdicts no better than chance on clear defects")
    out.write_text(json.dumps({name: r["score"] for name, r in results.items()}, indent=1))


def same_scores(a: Path, b: Path, tolerance: float = 1e-5) -> None:
    """The container and a local process must agree: same bundle, same runtime, same preprocessing."""
    first, second = json.loads(a.read_text()), json.loads(b.read_text())
    expect(first.keys() == second.keys(), "the two runs scored different images")
    worst = max(abs(first[k] - second[k]) / max(abs(first[k]), 1e-12) for k in first)
    print(f"{len(first)} scores, worst relative difference {worst:.2e}")
    expect(worst <= tolerance, f"scores differ by up to {worst:.2e} (relative)")


def bad_input(url: str) -> None:
    """Garbage and unknown models get JSON errors with stable codes, and the service stays up."""
    status, body = http(f"{url}/v1/models/brick:score", b"definitely not a png", "image/png")
    expect(400 <= status < 500, f"a non-image got HTTP {status}")
    expect("code" in json.loads(body)["error"], f"no error code in {body[:200]!r}")
    status, body = http(f"{url}/v1/models/no-such-model:score", b"x", "image/png")
    expect(status == 404 and json.loads(body)["error"]["code"] == "unknown_model", f"got {status} {body!r}")
    expect(http(f"{url}/healthz")[0] == 200, "the service stopped answering /healthz")
    print("bad input answered with 4xx JSON errors")


def sample(text: str, name: str, labels: dict[str, str]) -> float | None:
    """One sample's value from Prometheus text exposition, None when absent."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not match or match[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match[2] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match[3])
    return None


def check_metrics(url: str, min_requests: int, model: str = "brick") -> None:
    status, body = http(f"{url}/metrics")
    expect(status == 200, f"/metrics answered {status}")
    text = body.decode()
    served = sample(text, "mnemo_requests_total", {"model": model, "status": "200"}) or 0
    expect(served >= min_requests, f"mnemo_requests_total{{status=200}} is {served}, want >= {min_requests}")
    expect(sample(text, "mnemo_ready", {}) == 1.0, "mnemo_ready is not 1")
    images = sample(text, "mnemo_images_scored_total", {"model": model}) or 0
    expect(images >= min_requests, f"mnemo_images_scored_total is {images}")
    timed = sample(text, "mnemo_request_duration_seconds_count", {"model": model}) or 0
    expect(timed >= served, f"the latency histogram counted {timed} requests, the counter {served}")
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("mnemo_")}
    print(f"/metrics: {len(names)} mnemo_ series names, {served:g} successful requests, {images:g} images")


# --------------------------------------------------------------------------------------------- Prometheus


def prom_query(prom: str, expr: str) -> list[dict[str, Any]]:
    status, body = http(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    answer = json.loads(body)
    expect(status == 200 and answer.get("status") == "success", f"query {expr!r} failed: {body[:300]!r}")
    return answer["data"]["result"]


def wait_for(what: str, probe: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            expect(bool(value), f"timed out after {timeout_s:g} s waiting for {what}")
            return value
        time.sleep(1.0)


def panel_exprs(dashboard: Path) -> list[str]:
    """Every PromQL the dashboard runs, with Grafana's variables replaced by concrete values."""
    board = json.loads(dashboard.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    return [e.replace("$__rate_interval", "1m").replace("$model", ".+") for e in exprs]


def rule_exprs(rules: Path) -> list[str]:
    return [r["expr"] for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"]]


def check_prometheus(prom: str, dashboard: Path, rules: Path) -> None:
    """The target is up, mnemo_ series arrive, the rules load and every dashboard/alert query evaluates."""
    up = wait_for("the mnemo target to be up", lambda: prom_query(prom, 'up{job="mnemo"} == 1'))
    print(f"target up: {up[0]['metric'].get('instance')}")
    wait_for("mnemo_ series", lambda: prom_query(prom, 'count({__name__=~"mnemo_.+"}) > 10'))
    wait_for("scored requests", lambda: prom_query(prom, 'sum(mnemo_requests_total{status="200"}) > 0'))
    names = {r["metric"]["__name__"] for r in prom_query(prom, '{__name__=~"mnemo_.+"}')}
    print(f"{len(names)} mnemo_ series names stored, e.g. {sorted(names)[:4]}")
    loaded, wanted = wait_for("the alert rules", lambda: _rules(prom)), len(rule_exprs(rules))
    expect(len(loaded) == wanted, f"{len(loaded)} rules loaded, the rule file has {wanted}")
    wait_for("every rule evaluated", lambda: all(r.get("health") == "ok" for r in _rules(prom)))
    exprs = panel_exprs(dashboard) + rule_exprs(rules)
    for expr in exprs:
        prom_query(prom, expr)
    print(f"{len(loaded)} alert rules healthy; {len(exprs)} dashboard and alert queries evaluate")


def _rules(prom: str) -> list[dict[str, Any]]:
    answer = json.loads(http(f"{prom}/api/v1/rules")[1])
    return [rule for group in answer["data"]["groups"] for rule in group["rules"]]


# ------------------------------------------------------------------------------------------------- main


def failover(replicas: list[str], images: Path, kill: str, out: Path | None) -> None:
    """Two running replicas behind the reference HAProxy (``mnemo bench failover``'s ``balanced``), load
    through it, the first one stopped by ``kill`` (a shell-style command) mid-run: no client may see a
    failure, both must have served, and the balancer must stop needing retries within 3 s."""
    from mnemo.benchmarks.failover import balanced

    image = next(iter(sorted((images / "test" / GOOD).glob("*.png")))).read_bytes()
    result = balanced(
        replicas, lambda: subprocess.run(shlex.split(kill), check=True), image, "brick", 8.0, 3.0
    )
    if out is not None:
        out.write_text(json.dumps(result, indent=1))
    expect(result["sent"] > 100, f"only {result['sent']} requests in 8 s: {result}")
    expect(result["failed"] == 0, f"clients saw {result['failed']} failures {result['failed_statuses']}")
    expect(min(result["answered_by"].values()) > 0, f"a replica never answered: {result['answered_by']}")
    expect(result["retries_needed_for_s_after_kill"] < 3.0, f"retries went on for too long: {result}")
    print(
        f"{result['sent']} sent, {result['failed']} failed, {result['retried']} retried, retries needed for "
        f"{result['retries_needed_for_s_after_kill']} s after the kill"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("images").add_argument("out", type=Path)
    sub.add_parser("wait").add_argument("url")
    score = sub.add_parser("score")
    for name, kind in (("url", str), ("images", Path), ("out", Path)):
        score.add_argument(name, type=kind)
    score.add_argument("--model", default="brick")
    same = sub.add_parser("same-scores")
    same.add_argument("a", type=Path)
    same.add_argument("b", type=Path)
    sub.add_parser("bad-input").add_argument("url")
    metrics = sub.add_parser("metrics")
    metrics.add_argument("url")
    metrics.add_argument("min_requests", type=int)
    prom = sub.add_parser("prometheus")
    for name, kind in (("prom", str), ("dashboard", Path), ("rules", Path)):
        prom.add_argument(name, type=kind)
    over = sub.add_parser("failover")
    over.add_argument("replicas", nargs=2)
    over.add_argument("images", type=Path)
    over.add_argument("--kill", required=True)
    over.add_argument("--out", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "images": lambda: make_images(args.out),
        "wait": lambda: wait_ready(args.url),
        "score": lambda: score_all(args.url, args.images, args.out, args.model),
        "same-scores": lambda: same_scores(args.a, args.b),
        "bad-input": lambda: bad_input(args.url),
        "metrics": lambda: check_metrics(args.url, args.min_requests),
        "prometheus": lambda: check_prometheus(args.prom, args.dashboard, args.rules),
        "failover": lambda: failover(args.replicas, args.images, args.kill, args.out),
    }
    try:
        commands[args.command]()
    except (CheckError, OSError, KeyError, ValueError, RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
