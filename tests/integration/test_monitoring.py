"""Monitoring from the outside: a real Prometheus server (Debian's `prometheus`, installed by
`make prometheus`) runs the shipped deploy/prometheus/prometheus.yml, with this machine's
addresses for the compose services, against a stack (fake engine: the queue is what is
measured), finds every part of it and answers the queue depth; the provisioned Grafana
dashboard's queries are valid PromQL and name metrics that a real scrape has, the
`vllm:*` ones in the real engine's worker (the session stack); the compose file's
monitoring profile holds together."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from stack import Stack, free_port  # noqa: E402

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
GRAFANA = ROOT / "deploy/grafana"
DASHBOARD = GRAFANA / "dashboards/llmq.json"
COMPOSE = ROOT / "docker-compose.yml"
MODEL = "SmolLM2-135M-Instruct"
KEY = "sk-monitoring-5e6f7a"
FLOWER_AUTH = ("ops", "monitoring-secret")
QUEUED = 5
# What the issue asks the dashboard to show: queue depth and wait, TTFT, tokens/s, slots
# in use, errors, KV cache (each a metric some panel must query).
REQUIRED = {
    "llmq_queue_waiting_jobs",
    "llmq_queue_oldest_wait_seconds",
    "llmq_queue_wait_seconds_bucket",
    "llmq_time_to_first_token_seconds_bucket",
    "vllm:generation_tokens_total",
    "llmq_slots_in_use",
    "llmq_slots_capacity",
    "llmq_rejections_total",
    "llmq_jobs_ended_total",
    "vllm:kv_cache_usage_perc",
    "llmq_open_streams",
}
# Series Prometheus makes itself for every target, found in no scrape.
SYNTHETIC = {"up"}


def wait(predicate, timeout: float = 60, step: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"{what} not met in time")


# -- PromQL and the exposition format ------------------------------------------------------

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or"}
PROMQL_WORDS |= {"unless", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (every identifier that is not a
    function, an aggregation, a keyword or inside label matchers, ranges or groupings)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\w+", " ", e)
    names = set()
    for m in re.finditer(r"(?<![A-Za-z0-9_.:])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end() :].lstrip().startswith("(") or m.group() in PROMQL_WORDS:
            continue  # a function or an aggregation
        names.add(m.group())
    return names


SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def scraped_names(url: str, **kwargs) -> set[str]:
    """Every series name a scrape of `url` declares, parsed with prometheus_client's
    parser (a labelled metric no one has touched yet has its family but no samples)."""
    resp = httpx.get(url, timeout=30, **kwargs)
    resp.raise_for_status()
    names: set[str] = set()
    for family in text_string_to_metric_families(resp.text):
        names.update(family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and template variable of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        for target in panel["targets"]:
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            out.append((f"variable {var['name']}", m.group(1) if m else query))
    return out


def as_promql(expr: str) -> str:
    """A dashboard expression with its Grafana variables given values."""
    expr = expr.replace("$__rate_interval", "1m").replace("$model", ".*")
    assert "$" not in expr, f"a variable the test does not know in {expr!r}"
    return expr


# -- a stack and a Prometheus scraping it --------------------------------------------------


@pytest.fixture(scope="module")
def mon(tmp_path_factory):
    """The fake engine (0.05 s a step), with API keys (the metrics need none), Flower behind
    its login, and the worker's metrics on a free port."""
    logs = tmp_path_factory.mktemp("monitoring-logs")
    s = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=free_port(),
        log_dir=logs,
        env={
            "ENGINE": "fake",
            "FAKE_STEP_SECONDS": "0.05",
            "WORKER_SLOTS": "4",
            "HEARTBEAT_SECONDS": "0.5",
            # The stopped worker stays live (and its jobs queued) however slow this machine is.
            "WORKER_TTL_SECONDS": "60",
            "WORKER_METRICS_PORT": "0",
            "API_KEYS": KEY,
            "FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH),
            "FILES_DIR": str(logs / "files"),
        },
    )
    try:
        s.start_redis()
        s.start_worker()
        s.start_api()
        s.start_flower()
        s.wait_ready(MODEL, timeout=120)
    except BaseException:
        s.stop()
        raise
    yield s
    s.stop()


def local_config(shipped: dict, api: str, flower: str) -> dict:
    """The shipped config with this machine's addresses for the compose services (the API
    as one static target instead of Docker's DNS), scraping and discovering every second."""
    cfg = copy.deepcopy(shipped)
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert set(jobs) == {"llmq-api", "llmq-worker", "flower"}, jobs.keys()
    (dns,) = jobs["llmq-api"].pop("dns_sd_configs")
    assert dns["names"] == ["api"] and dns["port"] == 8000
    jobs["llmq-api"]["static_configs"] = [{"targets": [api]}]
    (sd,) = jobs["llmq-worker"]["http_sd_configs"]
    url = urlsplit(sd["url"])
    assert url.netloc == "api:8000" and url.path == "/metrics/targets", sd
    sd.update(url=f"http://{api}{url.path}", refresh_interval="1s")
    (static,) = jobs["flower"]["static_configs"]
    assert static["targets"] == ["flower:5555"]
    static["targets"] = [flower]
    return cfg


@pytest.fixture(scope="module")
def prom(mon: Stack, tmp_path_factory):
    """A Prometheus server of its own (port, config, storage) scraping `mon`: its base URL."""
    binary = shutil.which("prometheus")
    assert binary, "no prometheus binary: `make prometheus` installs Debian's package"
    home = tmp_path_factory.mktemp("prometheus")
    config = home / "prometheus.yml"
    shipped = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    api = f"127.0.0.1:{mon.api_port}"
    config.write_text(yaml.safe_dump(local_config(shipped, api, f"127.0.0.1:{mon.flower_port}")))
    port = free_port()
    log = open(home / "prometheus.log", "wb")  # noqa: SIM115
    popen = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert popen.poll() is None, (home / "prometheus.log").read_text()
        try:
            return httpx.get(url + "/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait(ready, 60, what="Prometheus ready")
        yield url
    finally:
        popen.terminate()
        try:
            popen.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(10)
        log.close()


def query(prom: str, promql: str) -> list[dict]:
    resp = httpx.get(prom + "/api/v1/query", params={"query": promql}, timeout=10)
    body = resp.json()
    assert body["status"] == "success", (promql, body)
    return body["data"]["result"]


def scalar(prom: str, promql: str) -> float | None:
    """The value of a query answering one series; None when it answers none."""
    result = query(prom, promql)
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None


def targets_up(prom: str) -> dict[str, list[dict]]:
    targets = httpx.get(prom + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    up: dict[str, list[dict]] = {}
    for t in targets:
        if t["health"] == "up":
            up.setdefault(t["labels"]["job"], []).append(t)
    return up


# -- the tests ----------------------------------------------------------------------------


def test_prometheus_finds_every_part_and_sees_the_queue_while_the_worker_is_stopped(mon: Stack, prom: str):
    """Every part is scraped (the worker found through the API's /metrics/targets, with its
    model and id as labels; Flower behind its login); with the worker stopped, K jobs
    queued show as the queue depth in PromQL; resumed, they run, the depth falls back to
    0 and the workers' completed-jobs counter, through Prometheus, rises by K."""
    (worker_id, metrics_url), *others = mon.worker_metrics_urls().items()
    assert not others
    up = wait(lambda: (u := targets_up(prom)) and {"llmq-api", "llmq-worker", "flower"} <= u.keys() and u, 60)
    (worker,) = up["llmq-worker"]
    assert worker["labels"]["model"] == MODEL and worker["labels"]["worker"] == worker_id
    assert worker["scrapeUrl"] == metrics_url
    depth = f'max(llmq_queue_waiting_jobs{{model="{MODEL}", priority="interactive"}})'
    completed = f'sum(llmq_worker_jobs_total{{job="llmq-worker", model="{MODEL}", outcome="completed"}})'
    wait(lambda: scalar(prom, depth) == 0, 60, what="an empty queue in Prometheus")
    wait(lambda: scalar(prom, completed) is not None, 30, what="the worker's counters in Prometheus")
    before = scalar(prom, completed)
    assert before is not None

    pid = mon.proc("worker1").popen.pid
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "background": True}
    os.kill(pid, signal.SIGSTOP)
    try:
        with httpx.Client(base_url=mon.api_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as h:
            for _ in range(QUEUED):
                resp = h.post("/v1/chat/completions", json=body)
                assert resp.status_code == 200 and resp.json()["status"] == "queued", resp.text
        wait(lambda: scalar(prom, depth) == QUEUED, 60, what=f"queue depth {QUEUED} in Prometheus")
        assert scalar(prom, f'max(llmq_queue_oldest_wait_seconds{{model="{MODEL}"}})') > 0
    finally:
        os.kill(pid, signal.SIGCONT)
    wait(lambda: scalar(prom, depth) == 0, 60, what="the queue drained in Prometheus")
    wait(lambda: scalar(prom, completed) == before + QUEUED, 60, what=f"{QUEUED} more completed jobs in Prometheus")


def test_the_dashboard_queries_are_promql_over_metrics_the_stack_serves(mon: Stack, prom: str):
    """Every panel has queries; each is valid PromQL (Prometheus runs it) on the provisioned
    data source; every metric it names but vLLM's is in a real scrape of the API, the
    worker or Flower; and the panels the issue asks for are there."""
    dash = json.loads(DASHBOARD.read_text())
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert dash["uid"] and dash["title"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert (target.get("datasource") or panel["datasource"])["uid"] == source["uid"], panel["title"]

    (metrics_url,) = mon.worker_metrics_urls().values()
    served = scraped_names(mon.api_url + "/metrics") | scraped_names(metrics_url)
    served |= scraped_names(f"http://127.0.0.1:{mon.flower_port}/metrics", auth=FLOWER_AUTH)
    used: set[str] = set()
    for where, expr in dashboard_queries():
        query(prom, as_promql(expr))  # asserts Prometheus accepts it
        names = metric_names(expr)
        assert names, (where, expr)
        used |= names
        missing = {n for n in names if not n.startswith("vllm:")} - served - SYNTHETIC
        assert not missing, f"{where} queries {sorted(missing)}, which no scrape of the stack has"
    assert REQUIRED <= used, sorted(REQUIRED - used)


def test_the_dashboards_vllm_metrics_are_served_by_a_real_engines_worker(stack: Stack):
    """The `vllm:*` names the dashboard queries (the fake engine has none) are in a scrape
    of the real engine's worker, found through its registration in Redis."""
    wanted = {n for _, expr in dashboard_queries() for n in metric_names(expr) if n.startswith("vllm:")}
    assert wanted  # tokens/s and KV cache at least
    urls = stack.worker_metrics_urls()
    assert urls, "the worker announced no metrics URL"
    for url in urls.values():
        missing = wanted - scraped_names(url)
        assert not missing, f"{url} has no {sorted(missing)}"


def test_the_compose_monitoring_profile_holds_together():
    """Prometheus and Grafana run only with `--profile monitoring`, from files that exist,
    mounted where the provisioning looks; the worker's metrics port is fixed (Prometheus
    reaches it through the API's service discovery); the data source is that Prometheus;
    promtool accepts the shipped Prometheus config."""
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], name
    assert all("profiles" not in s for n, s in services.items() if n not in ("prometheus", "grafana"))
    mounts: dict[str, Path] = {}
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source, target, *_ = volume.split(":")
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume
                mounts[target] = ROOT / source
            else:
                assert source in compose["volumes"], volume
    config = next(a.split("=", 1)[1] for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    assert mounts[config] == PROMETHEUS_CONFIG
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    (provider,) = yaml.safe_load((GRAFANA / "provisioning/dashboards/llmq.yml").read_text())["providers"]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounts[str(Path(home).parent)] / Path(home).name == DASHBOARD
    (source,) = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert urlsplit(source["url"]).hostname == "prometheus"
    assert int(services["worker"]["environment"]["WORKER_METRICS_PORT"]) > 0
    # The shipped file as it is (the test above runs it with local addresses).
    promtool = shutil.which("promtool")
    assert promtool, "no promtool: `make prometheus` installs Debian's prometheus package"
    check = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
