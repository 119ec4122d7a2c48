"""The production deployment shape: docker-compose.yml, Dockerfile and the configs they mount.

No container engine runs in CI, so these tests parse the files and check the
security and wiring properties that matter (no broker/Redis/PostgreSQL port on
the host, passwords only from the environment, Redis durable, Prometheus
scraping exactly the workers, …). When ``promtool`` is on PATH the Prometheus
configuration and rules are checked with it too.
"""

from __future__ import annotations

import glob
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROM_DIR = ROOT / "configs" / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
PROM_RULES = PROM_DIR / "rules"

INFRA = ("kafka", "redis", "postgres")
WORKERS = ("worker-1", "worker-2")
LOOPBACK_UIS = {"prometheus": 9090, "grafana": 3000}
ALL_SERVICES = INFRA + WORKERS + tuple(LOOPBACK_UIS)
SECRETS = ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD")
WORKER_PORT = 6066


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def env_of(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command_of(svc: dict) -> list[str]:
    cmd = svc.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def mounts_of(svc: dict) -> list[dict]:
    """Volumes as dicts {type, source, target, read_only}, from the short or long syntax."""
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            out.append({"type": v.get("type", "volume"), "source": v.get("source"), "target": v["target"],
                        "read_only": bool(v.get("read_only", False))})
            continue
        parts = v.split(":")
        if len(parts) == 1:  # anonymous volume
            out.append({"type": "volume", "source": None, "target": parts[0], "read_only": False})
            continue
        src, target = parts[0], parts[1]
        opts = parts[2].split(",") if len(parts) > 2 else []
        kind = "bind" if src.startswith((".", "/", "~")) else "volume"
        out.append({"type": kind, "source": src, "target": target, "read_only": "ro" in opts})
    return out


def published(svc: dict) -> list[tuple[str | None, str, str]]:
    """(host_ip, host_port, container_port) for every published port, short or long syntax."""
    out = []
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            out.append((p.get("host_ip"), str(p.get("published", "")), str(p["target"])))
            continue
        spec = str(p).split("/")[0]
        parts = spec.rsplit(":", 2)
        if len(parts) == 3:
            out.append((parts[0].strip("[]"), parts[1], parts[2]))
        elif len(parts) == 2:
            out.append((None, parts[0], parts[1]))
        else:
            out.append((None, "", parts[0]))
    return out


def repo_path(host_path: str) -> Path:
    return (ROOT / host_path).resolve() if not host_path.startswith("/") else Path(host_path)


def container_to_repo(svc: dict, container_path: str) -> Path | None:
    """Map a path inside the container to the repo file behind a bind mount, if any."""
    cp = PurePosixPath(container_path)
    for m in mounts_of(svc):
        if m["type"] != "bind":
            continue
        tgt = PurePosixPath(m["target"])
        if cp == tgt or tgt in cp.parents:
            return repo_path(m["source"]) / cp.relative_to(tgt)
    return None


VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}")


def strings_in(node) -> list[str]:
    """Every string value (and key) of a parsed YAML document, comments excluded."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings_in(k) + strings_in(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings_in(v)]
    return [node] if isinstance(node, str) else []


def interpolate(value: str) -> str:
    """What compose substitutes, with each variable set to ``<name>-value``."""
    return VAR_REF.sub(lambda m: f"{m.group(1).lower()}-value", value)


def kafka_listener_ports(kafka_env: dict[str, str], var: str) -> dict[str, tuple[str, int]]:
    """{listener name: (host, port)} from KAFKA_LISTENERS / KAFKA_ADVERTISED_LISTENERS."""
    out = {}
    for item in kafka_env.get(var, "").split(","):
        name, _, hostport = item.strip().partition("://")
        host, _, port = hostport.rpartition(":")
        out[name] = (host, int(port))
    return out


# --------------------------------------------------------------------------- services and exposure


def test_every_service_exists(services):
    missing = [s for s in ALL_SERVICES if s not in services]
    assert not missing, f"docker-compose.yml lacks services {missing}"
    assert services["kafka"]["image"] == "apache/kafka:3.8.0"
    assert services["redis"]["image"].split(":")[0] == "redis"
    assert services["postgres"]["image"].split(":")[0] == "postgres"
    assert services["prometheus"]["image"] == "prom/prometheus:v2.42.0"
    assert services["grafana"]["image"] == "grafana/grafana:10.4.2"


@pytest.mark.parametrize("name", INFRA + WORKERS)
def test_backends_publish_no_host_port(services, name):
    svc = services[name]
    assert not svc.get("ports"), f"{name} publishes {svc['ports']} on the host; it must stay on the compose network"
    assert svc.get("network_mode") != "host", f"{name} must not use the host network"


@pytest.mark.parametrize("name,port", sorted(LOOPBACK_UIS.items()))
def test_uis_publish_on_loopback_only(services, name, port):
    ports = published(services[name])
    assert ports, f"{name} should be reachable from the host on 127.0.0.1:{port}"
    for host_ip, host_port, container_port in ports:
        assert host_ip == "127.0.0.1", f"{name} publishes {host_port}->{container_port} on {host_ip or 'all interfaces'}"
    assert (("127.0.0.1", str(port), str(port)) in ports), f"{name} should publish 127.0.0.1:{port}:{port}"


def test_single_network_and_all_services_on_it(compose, services):
    nets = compose.get("networks") or {}
    assert len(nets) == 1, f"expected one network, got {list(nets)}"
    (net,) = nets
    for name in ALL_SERVICES:
        assert net in (services[name].get("networks") or []), f"{name} is not on network {net}"


def test_kafka_listens_only_for_the_compose_network(services):
    env = env_of(services["kafka"])
    assert "broker" in env["KAFKA_PROCESS_ROLES"] and "controller" in env["KAFKA_PROCESS_ROLES"], "single-node KRaft"
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env
    advertised = kafka_listener_ports(env, "KAFKA_ADVERTISED_LISTENERS")
    for name, (host, _port) in advertised.items():
        assert host == "kafka", f"listener {name} advertises {host}, not the compose service name"
    # The controller (KRaft quorum) listener is loopback-only on a single node.
    controllers = env["KAFKA_CONTROLLER_LISTENER_NAMES"].split(",")
    listeners = kafka_listener_ports(env, "KAFKA_LISTENERS")
    for c in controllers:
        assert listeners[c][0] in ("localhost", "127.0.0.1"), f"controller listener {c} is not on loopback"
    assert any(m["target"] == env["KAFKA_LOG_DIRS"] and m["type"] == "volume" for m in mounts_of(services["kafka"])), \
        "Kafka's log dirs must be on a named volume"


# --------------------------------------------------------------------------- mounts and volumes


def test_bind_mounted_host_paths_exist_and_are_read_only(services):
    seen = 0
    for name, svc in services.items():
        for m in mounts_of(svc):
            if m["type"] != "bind":
                continue
            seen += 1
            assert repo_path(m["source"]).exists(), f"{name}: bind-mount source {m['source']} does not exist in the repo"
            assert m["read_only"], f"{name}: bind mount {m['source']} -> {m['target']} must be read-only"
    assert seen >= 6


def test_named_volumes_are_declared(compose, services):
    declared = set(compose.get("volumes") or {})
    used = {(name, m["source"]) for name, svc in services.items() for m in mounts_of(svc)
            if m["type"] == "volume" and m["source"]}
    undeclared = {(n, v) for n, v in used if v not in declared}
    assert not undeclared, f"named volumes used but not declared: {sorted(undeclared)}"
    for name in ("kafka", "redis", "postgres", "prometheus", "grafana"):
        assert any(m["type"] == "volume" for m in mounts_of(services[name])), f"{name} has no named data volume"


def test_workers_have_separate_state_volumes(services):
    vols = [{m["source"] for m in mounts_of(services[w]) if m["type"] == "volume" and m["target"] == "/var/lib/claimwatch"}
            for w in WORKERS]
    assert all(vols), "each worker needs a named volume at CLAIMWATCH_DATA_DIR"
    assert not (vols[0] & vols[1]), "the two workers must not share Faust state"


# --------------------------------------------------------------------------- secrets


def test_every_secret_is_required_from_the_environment(compose):
    values = strings_in(compose)
    refs = [ref for v in values for ref in VAR_REF.findall(v)]
    assert {name for name, _ in refs} >= set(SECRETS)
    for name, rest in refs:
        assert rest.startswith(":?"), f"${{{name}{rest}}} must be ${{{name}:?…}} (no default, refuse to start if unset)"
    assert not any("change-me" in v for v in values)


def test_env_example_lists_every_variable_with_placeholders(compose):
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    values = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    compose_vars = {name for v in strings_in(compose) for name, _ in VAR_REF.findall(v)}
    assert set(values) == compose_vars
    assert all(v == "change-me" for v in values.values())


def test_postgres_and_grafana_passwords_from_env(services):
    assert env_of(services["postgres"])["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert env_of(services["grafana"])["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")


# --------------------------------------------------------------------------- redis


def _redis_conf(services) -> tuple[list[str], dict[str, str], Path]:
    svc = services["redis"]
    cmd = command_of(svc)
    confs = [c for c in cmd if c.endswith(".conf")]
    assert confs, "redis-server should be started with the mounted redis.conf"
    host = container_to_repo(svc, confs[0])
    assert host is not None and host.is_file(), f"{confs[0]} is not bind-mounted from the repo"
    conf = {}
    for line in host.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            conf[key.lower()] = value.strip()
    return cmd, conf, host


def test_redis_is_durable_and_never_evicts(services):
    cmd, conf, _ = _redis_conf(services)

    def setting(key: str) -> str | None:
        flag = f"--{key}"
        if flag in cmd:
            return cmd[cmd.index(flag) + 1]
        return conf.get(key)

    assert setting("appendonly") == "yes"
    assert setting("appendfsync") == "everysec"
    assert setting("maxmemory-policy") == "noeviction"
    assert setting("protected-mode") == "yes"


def test_redis_requires_a_password_never_stored_in_the_file(services):
    cmd, conf, host = _redis_conf(services)
    assert "--requirepass" in cmd, "redis-server must be started with --requirepass"
    assert cmd[cmd.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    assert "requirepass" not in conf, f"{host} must not hold the password"


# --------------------------------------------------------------------------- workers


@pytest.mark.parametrize("name", WORKERS)
def test_worker_wiring(services, name):
    svc = services[name]
    assert svc.get("build") in (".", {"context": "."}) or (svc.get("build") or {}).get("context") == "."
    assert command_of(svc) == ["worker", "--web-port", str(WORKER_PORT)]
    assert svc.get("restart") == "unless-stopped"
    env = env_of(svc)

    kafka = urlsplit(env["CLAIMWATCH_KAFKA_URL"])
    assert kafka.scheme == "kafka" and kafka.hostname == "kafka"
    advertised = kafka_listener_ports(env_of(services["kafka"]), "KAFKA_ADVERTISED_LISTENERS")
    assert ("kafka", kafka.port) in advertised.values(), \
        f"{name} connects to kafka:{kafka.port}, which the broker does not advertise ({advertised})"

    r = urlsplit(interpolate(env["CLAIMWATCH_REDIS_URL"]))
    assert r.scheme == "redis" and r.hostname == "redis" and (r.port or 6379) == 6379
    assert r.password == "redis_password-value", "workers must authenticate to Redis with REDIS_PASSWORD"

    store = urlsplit(interpolate(env["CLAIMWATCH_STORE_URL"]))
    assert store.scheme == "postgresql" and store.hostname == "postgres"
    assert store.password == "postgres_password-value"
    assert store.path.lstrip("/") == env_of(services["postgres"])["POSTGRES_DB"]
    assert store.username == env_of(services["postgres"])["POSTGRES_USER"]

    assert env["CLAIMWATCH_TOPIC_PARTITIONS"] == "8"
    assert env["CLAIMWATCH_WEB_BIND"] == "0.0.0.0", "Prometheus cannot scrape a worker bound to loopback"
    assert env["CLAIMWATCH_DATA_DIR"] == "/var/lib/claimwatch"

    rules = env["CLAIMWATCH_RULES_PATH"]
    m = [m for m in mounts_of(svc) if m["target"] == rules]
    assert m and m[0]["type"] == "bind" and m[0]["read_only"], "rules must be bind-mounted read-only at CLAIMWATCH_RULES_PATH"
    assert repo_path(m[0]["source"]) == ROOT / "configs" / "rules.yaml"

    deps = svc.get("depends_on") or {}
    for dep in INFRA:
        assert isinstance(deps, dict) and deps.get(dep, {}).get("condition") == "service_healthy", \
            f"{name} must wait for {dep} to be healthy"
        assert services[dep].get("healthcheck", {}).get("test"), f"{dep} has no healthcheck to wait for"


def test_workers_are_two_distinct_services(services):
    a, b = (services[w] for w in WORKERS)
    assert a.get("container_name") is None or a.get("container_name") != b.get("container_name")
    assert env_of(a)["CLAIMWATCH_KAFKA_URL"] == env_of(b)["CLAIMWATCH_KAFKA_URL"]


# --------------------------------------------------------------------------- prometheus and grafana


@pytest.fixture(scope="module")
def prom() -> dict:
    return yaml.safe_load(PROM_CONFIG.read_text(encoding="utf-8"))


def test_prometheus_mounts_its_config_read_only(services):
    svc = services["prometheus"]
    assert container_to_repo(svc, "/etc/prometheus/prometheus.yml") == PROM_CONFIG
    cmd = command_of(svc)
    cfg = [c.split("=", 1)[1] for c in cmd if c.startswith("--config.file=")]
    assert not cfg or cfg == ["/etc/prometheus/prometheus.yml"]


def test_prometheus_scrapes_exactly_the_workers(prom, services):
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert "claimwatch" in jobs
    job = jobs["claimwatch"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert sorted(targets) == sorted(f"{w}:{WORKER_PORT}" for w in WORKERS)
    workers = {name for name, svc in services.items() if command_of(svc)[:1] == ["worker"]}
    assert {t.rsplit(":", 1)[0] for t in targets} == workers


def test_prometheus_rule_files_resolve_to_repo_rules(prom, services):
    assert "/etc/prometheus/rules/*.yml" in prom.get("rule_files", [])
    files = []
    for pattern in prom["rule_files"]:
        host = container_to_repo(services["prometheus"], pattern)
        assert host is not None, f"rule_files {pattern} is not under a bind mount"
        files += glob.glob(str(host))
    assert files, "rule_files match no file in configs/prometheus/rules/"


def test_alert_rule_worker_down():
    doc = yaml.safe_load((PROM_RULES / "claimwatch.yml").read_text(encoding="utf-8"))
    groups = {g["name"]: g for g in doc["groups"]}
    rules = {r["alert"]: r for r in groups["claimwatch"]["rules"] if "alert" in r}
    rule = rules["ClaimwatchWorkerDown"]
    assert re.sub(r"\s+", "", rule["expr"]) == 'up{job="claimwatch"}==0'
    assert rule["for"] == "2m"
    assert rule["labels"]["severity"]
    assert rule["annotations"]["summary"] and rule["annotations"]["runbook"]


def test_grafana_provisioning(services):
    svc = services["grafana"]
    ds_file = container_to_repo(svc, "/etc/grafana/provisioning/datasources/prometheus.yml")
    assert ds_file and ds_file.is_file()
    ds = {d["uid"]: d for d in yaml.safe_load(ds_file.read_text(encoding="utf-8"))["datasources"]}
    assert ds["prometheus"]["type"] == "prometheus"
    url = urlsplit(ds["prometheus"]["url"])
    assert url.hostname == "prometheus" and url.port == 9090 and "prometheus" in services

    prov_file = container_to_repo(svc, "/etc/grafana/provisioning/dashboards/claimwatch.yml")
    assert prov_file and prov_file.is_file()
    providers = yaml.safe_load(prov_file.read_text(encoding="utf-8"))["providers"]
    paths = [p["options"]["path"] for p in providers if p.get("type") == "file"]
    assert paths == ["/var/lib/grafana/dashboards"]
    dash_dir = container_to_repo(svc, paths[0])
    assert dash_dir and dash_dir.is_dir() and (dash_dir / ".gitkeep").exists()


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_copy_sources_exist_and_cover_the_packages():
    instr = _dockerfile_instructions()
    copied = set()
    for op, rest in instr:
        if op not in ("COPY", "ADD"):
            continue
        if "--from=" in rest:  # copies from another build stage, not from the repo
            continue
        args = [a for a in shlex.split(rest) if not a.startswith("--")]
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
            copied.add(src.rstrip("/"))
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]
    assert {"pyproject.toml", "configs", *packages} <= copied


def test_dockerfile_shape():
    instr = _dockerfile_instructions()
    ops = dict(instr)  # last wins, as in Docker
    assert instr[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(rest for op, rest in instr if op == "RUN")
    assert re.search(r"pip install [\"']?\.\[postgres\]", runs)
    user = ops.get("USER", "root").split(":")[0]
    assert user not in ("root", "0"), "the image must run as a non-root user"
    assert ops["ENTRYPOINT"] == '["claimwatch"]'
    assert ops["CMD"] == f'["worker", "--web-port", "{WORKER_PORT}"]'
    hc = ops["HEALTHCHECK"]
    assert f"http://127.0.0.1:{WORKER_PORT}/healthz" in hc and "urllib" in hc


# --------------------------------------------------------------------------- promtool


promtool = shutil.which("promtool")


@pytest.mark.skipif(promtool is None, reason="promtool not on PATH")
def test_promtool_check_rules():
    files = sorted(str(p) for p in PROM_RULES.glob("*.yml"))
    assert files
    res = subprocess.run([promtool, "check", "rules", *files], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.skipif(promtool is None, reason="promtool not on PATH")
def test_promtool_check_config(tmp_path, prom):
    # rule_files point into the container (/etc/prometheus/rules); check a copy
    # whose rule_files point at the repo so promtool also loads the rules.
    cfg = dict(prom)
    cfg["rule_files"] = [str(PROM_RULES / "*.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    res = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    found = re.search(r"SUCCESS: (\d+) rules found", res.stdout + res.stderr)
    assert found and int(found.group(1)) >= 1, "promtool loaded no rules through rule_files"
