"""deploy/ checked without Docker or a cluster: each file passes its linter (hadolint, the Kubernetes
schemas via kubernetes-validate, the compose spec via compose-spec, `nginx -t`), and the files agree
with the code: the image's entrypoint is the `chatbot` script, every `chatbot serve` command line parses
with the real CLI, ports line up end to end, every environment variable is one the service reads (or
feeds a flag), probes hit the documented endpoints, the HPA's metric is one the service exports, and
the termination grace covers the service's drain."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from bench.cluster import NGINX, nginx_globals, render_nginx_conf
from chatbot.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "cuda.Dockerfile"]
# aiohttp's shutdown_timeout after the drain, plus headroom for closing Redis and exiting.
AFTER_DRAIN_S = 15
# Variables every image or process environment may carry that the service does not read.
GENERIC_ENV = {"PATH", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK", "DEBIAN_FRONTEND",
               "OMP_NUM_THREADS"}


def serve_args(argv: list[str]):
    """Parse a `chatbot ...` command line with the real CLI (exits on an unknown flag)."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"`chatbot {' '.join(argv)}` does not parse") from e


def env_read_by_code() -> set[str]:
    names = set()
    for path in (REPO / "chatbot").rglob("*.py"):
        names |= set(re.findall(r"""environ(?:\.get)?[\[(]\s*["']([A-Z_][A-Z0-9_]*)["']""", path.read_text()))
        names |= set(re.findall(r"""getenv\(\s*["']([A-Z_][A-Z0-9_]*)["']""", path.read_text()))
    return names


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def k8s_docs() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(K8S.glob("*.yaml"))}


def k8s_resource(kind: str, name: str) -> dict:
    found = [d for docs in k8s_docs().values() for d in docs if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


# ----------------------------------------------------------------------------------------- layout


def test_deploy_is_not_a_python_package() -> None:
    assert not (DEPLOY / "__init__.py").exists()
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(p.startswith("deploy") for p in include)


# ----------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    run = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_the_chatbot_script_with_a_valid_serve_command(dockerfile: Path) -> None:
    ins = dockerfile_instructions(dockerfile)
    last_stage = ins[max(i for i, (k, _) in enumerate(ins) if k == "FROM"):]
    get = lambda key: [v for k, v in last_stage if k == key]  # noqa: E731
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = yaml.safe_load(get("ENTRYPOINT")[-1])
    assert entrypoint == ["chatbot"] and "chatbot" in scripts
    cmd = yaml.safe_load(get("CMD")[-1])
    args = serve_args(cmd)
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert get("EXPOSE") == [str(args.port)]
    health = get("HEALTHCHECK")[-1]
    assert f"http://127.0.0.1:{args.port}/healthz" in health
    assert "STOPSIGNAL SIGTERM" in dockerfile.read_text()
    # Every ENV the final image sets is read by the service or is generic.
    env_names = {m for v in get("ENV") for m in re.findall(r"([A-Z_][A-Z0-9_]*)=", v)}
    assert env_names - GENERIC_ENV <= env_read_by_code(), env_names - GENERIC_ENV - env_read_by_code()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_copies_every_packaged_folder(dockerfile: Path) -> None:
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    copied = {v.split()[0] for k, v in dockerfile_instructions(dockerfile) if k == "COPY" and not v.startswith("--from")}
    assert packages <= copied, packages - copied
    for folder in packages:
        assert (REPO / folder).is_dir()
    ignore = (DEPLOY / f"{dockerfile.name}.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:] and {f"!{p}/" for p in packages} <= set(ignore)


# ----------------------------------------------------------------------------------------- compose


def compose_with_defaults() -> str:
    """compose.yaml with ${VAR:-default} interpolated as `docker compose` does when VAR is unset."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), (DEPLOY / "compose.yaml").read_text())


def test_compose_file_follows_the_compose_spec() -> None:
    from compose_spec import PyCompose

    PyCompose.from_yaml(compose_with_defaults()).validate()
    with pytest.raises(ValueError):  # the check can fail: an unknown key is refused
        PyCompose.from_yaml(compose_with_defaults().replace("restart: unless-stopped", "restart_policy: always", 1))


def test_compose_services_agree_with_the_code() -> None:
    compose = yaml.safe_load(compose_with_defaults())
    services = compose["services"]
    redis, chat, nginx = services["redis"], services["chat"], services["nginx"]
    assert redis["command"][:3] == ["redis-server", "--appendonly", "yes"]  # AOF persistence
    assert "redis-data:/data" in redis["volumes"] and "redis-data" in compose["volumes"]
    args = serve_args(chat["command"])
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert set(chat["environment"]) <= env_read_by_code()
    assert re.fullmatch(r"redis://redis:6379/\d+", chat["environment"]["REDIS_URL"])
    assert chat["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert chat["deploy"]["replicas"] >= 2
    assert f"http://127.0.0.1:{args.port}/readyz" in " ".join(chat["healthcheck"]["test"])
    grace = float(chat["stop_grace_period"].rstrip("s"))
    assert grace >= args.shutdown_grace + AFTER_DRAIN_S
    # nginx: the mounted config is deploy/nginx/nginx.conf, whose upstream is the chat service's port.
    source, target = nginx["volumes"][0].split(":")[:2]
    assert (DEPLOY / source).resolve() == (DEPLOY / "nginx" / "nginx.conf") and target == "/etc/nginx/nginx.conf"
    assert re.search(rf"server chat:{args.port}\b", (DEPLOY / "nginx" / "nginx.conf").read_text())
    assert nginx["depends_on"]["chat"]["condition"] == "service_healthy"
    assert nginx["ports"][0].endswith(":8080")


# ----------------------------------------------------------------------------------------- nginx


def test_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    if not Path(NGINX).exists():
        pytest.fail("Debian's nginx is needed: `make system-deps` installs it")
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx_conf([18001, 18002], 18000))
    run = subprocess.run([NGINX, "-t", "-c", str(conf), *nginx_globals(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    # Only the address lines differ from the shipped file.
    shipped, rendered = (DEPLOY / "nginx" / "nginx.conf").read_text().splitlines(), conf.read_text().splitlines()
    assert set(shipped) - set(rendered) == {"        server chat:8080 max_fails=1 fail_timeout=10s;  # rewritten by the test",
                                            "        listen 8080;  # rewritten by the test"}
    # and a broken file is caught
    conf.write_text(conf.read_text().replace("proxy_http_version 1.1;", "proxy_http_version 1.1"))
    assert subprocess.run([NGINX, "-t", "-c", str(conf), *nginx_globals(tmp_path)], capture_output=True).returncode != 0


def test_nginx_forwards_websocket_upgrades_and_host() -> None:
    text = (DEPLOY / "nginx" / "nginx.conf").read_text()
    for directive in ("proxy_http_version 1.1;", "proxy_set_header Upgrade $http_upgrade;",
                      "proxy_set_header Connection $connection_upgrade;", "proxy_set_header Host $http_host;",
                      "proxy_buffering off;"):
        assert directive in text, directive
    assert re.search(r"proxy_read_timeout (\d+)s;", text) and int(re.search(r"proxy_read_timeout (\d+)s;", text)[1]) > 30


# ----------------------------------------------------------------------------------------- kubernetes


@pytest.mark.parametrize("name", [p.name for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"])
def test_k8s_manifest_validates_against_the_kubernetes_schemas(name: str) -> None:
    import kubernetes_validate

    for doc in k8s_docs()[name]:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_k8s_schema_check_can_fail() -> None:
    import kubernetes_validate

    doc = k8s_resource("Deployment", "chatbot")
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def expanded_args(container: dict, env: dict[str, str]) -> list[str]:
    """The container's args after Kubernetes' $(VAR) expansion; every reference must be defined."""
    def sub(arg: str) -> str:
        for ref in re.findall(r"\$\((\w+)\)", arg):
            assert ref in env, f"$({ref}) is not defined"
        return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)
    return [sub(a) for a in container["args"]]


def test_k8s_deployment_agrees_with_the_code() -> None:
    deployment, configmap = k8s_resource("Deployment", "chatbot"), k8s_resource("ConfigMap", "chatbot")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert [s["configMapRef"]["name"] for s in container["envFrom"]] == ["chatbot"]
    env = configmap["data"]
    args = serve_args(expanded_args(container, env))
    assert args.command == "serve" and args.host == "0.0.0.0"
    # Each variable is read by the service or feeds one of the args.
    referenced = {ref for a in container["args"] for ref in re.findall(r"\$\((\w+)\)", a)}
    assert set(env) - referenced <= env_read_by_code(), set(env) - referenced - env_read_by_code()
    assert re.fullmatch(r"redis://redis-0\.redis:6379/\d+", env["REDIS_URL"])
    # Ports line up: the flag, the container port, the probes, the Service.
    (port,) = container["ports"]
    assert port["containerPort"] == args.port
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    service = k8s_resource("Service", "chatbot")
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(args.port) and annotations["prometheus.io/path"] == "/metrics"
    # Termination: the endpoint leaves the Service (preStop), then the drain, all before SIGKILL.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + args.shutdown_grace + AFTER_DRAIN_S
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's USER
    assert "USER 10001" in (DEPLOY / "Dockerfile").read_text()


def test_k8s_redis_and_autoscaler_agree_with_the_code() -> None:
    redis = k8s_resource("StatefulSet", "redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert container["args"][:3] == ["redis-server", "--appendonly", "yes"]
    assert redis["spec"]["serviceName"] == "redis" and k8s_resource("Service", "redis")["spec"]["clusterIP"] == "None"
    hpa = k8s_resource("HorizontalPodAutoscaler", "chatbot")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "chatbot" and hpa["spec"]["minReplicas"] >= 2
    pod_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pod_metrics
    # The documented /metrics names (tests/test_deploy_cluster.py scrapes them from live workers).
    endpoints = (REPO / "docs" / "protocol.md").read_text()
    for name in pod_metrics:
        assert f"`{name}`" in endpoints, name


def test_shell_snippets_in_comments_name_real_files() -> None:
    """The build commands in the Dockerfiles' and compose file's comments point at files that exist."""
    for path in [*DOCKERFILES, DEPLOY / "compose.yaml"]:
        for match in re.findall(r"-f (deploy/\S+)", path.read_text()):
            assert (REPO / match).exists(), (path.name, match)
