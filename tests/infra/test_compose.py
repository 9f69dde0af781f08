"""docker-compose.yml and infra/Dockerfile agree with the code.

Docker cannot run where the tests run, so these checks cover what drifts silently
between the compose file and the code: the commands, the settings names, the packages
copied into the image, the Kafka listeners and the ready files.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices

from infra.stack import SERVICES
from shared.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "infra" / "Dockerfile"
TOPICS_MODULE = "infra.topics"

Service = dict[str, Any]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def ours(compose: dict[str, Any]) -> dict[str, Service]:
    """The compose services built from our image (the others are Kafka and Qdrant)."""
    built = {
        name: service
        for name, service in compose["services"].items()
        if isinstance(service.get("build"), dict)
        and service["build"].get("dockerfile") == "infra/Dockerfile"
    }
    assert built, "no service is built from infra/Dockerfile"
    return built


def argv(service: Service) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def environment(service: Service) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(entry.split("=", 1) for entry in env)
    return {str(k): str(v) for k, v in env.items()}


def settings_aliases() -> set[str]:
    names: set[str] = set()
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, str):
            names.add(alias)
        elif isinstance(alias, AliasChoices):
            names.update(c for c in alias.choices if isinstance(c, str))
        else:
            names.add(field.upper())
    return names


def test_every_command_runs_a_module_that_exists(ours: dict[str, Service]) -> None:
    for name, service in ours.items():
        args = argv(service)
        assert args[:2] == ["python", "-m"], f"{name}: command is not `python -m ...`"
        spec = importlib.util.find_spec(args[2])
        assert spec is not None, f"{name}: module {args[2]} does not exist"
        if spec.submodule_search_locations:  # a package runs through its __main__
            assert any(
                (Path(folder) / "__main__.py").exists()
                for folder in spec.submodule_search_locations
            ), f"{name}: package {args[2]} has no __main__.py"


def test_services_are_those_the_local_stack_starts(ours: dict[str, Service]) -> None:
    # Options after the sub-command may differ (e.g. the gateway's --host in a container).
    in_compose = {
        name: argv(service)[2:4]
        for name, service in ours.items()
        if argv(service)[2] != TOPICS_MODULE
    }
    assert in_compose == {spec.name: [spec.module, spec.command] for spec in SERVICES}


def test_services_start_after_the_topics_exist(ours: dict[str, Service]) -> None:
    jobs = [name for name, service in ours.items() if argv(service)[2] == TOPICS_MODULE]
    assert len(jobs) == 1, "exactly one one-shot service must create the topics"
    for spec in SERVICES:
        depends = ours[spec.name].get("depends_on") or {}
        assert depends.get(jobs[0], {}).get("condition") == "service_completed_successfully", (
            f"{spec.name} must wait for {jobs[0]} to complete"
        )


def test_service_environment_uses_known_settings(
    ours: dict[str, Service], monkeypatch: pytest.MonkeyPatch
) -> None:
    known = settings_aliases()
    for name, service in ours.items():
        env = environment(service)
        unknown = sorted(set(env) - known)
        assert not unknown, f"{name}: not Settings variables: {unknown}"
        # The values must also be valid settings.
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            Settings()


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def first_party_closure(modules: list[str]) -> set[str]:
    """Top-level first-party packages that ``modules`` import, directly or not.

    Reads the source (no import runs); a module's parent packages count as imported,
    as Python runs their ``__init__`` first.
    """
    first_party = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    seen: set[str] = set()
    queue = list(modules)
    while queue:
        module = queue.pop()
        if module in seen or module.split(".")[0] not in first_party:
            continue
        seen.add(module)
        parts = module.split(".")
        queue += [".".join(parts[:i]) for i in range(1, len(parts))]
        path = _module_file(module)
        if path is None:
            continue
        package = module if path.name == "__init__.py" else ".".join(parts[:-1])
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                queue += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                queue.append(base)
                # `from package import submodule` imports the submodule too.
                queue += [f"{base}.{alias.name}" for alias in node.names]
    return {m.split(".")[0] for m in seen if _module_file(m) is not None}


def dockerfile_copies() -> set[str]:
    """Top-level names copied from the build context by COPY instructions."""
    copied: set[str] = set()
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if not words or words[0].upper() != "COPY" or any(w.startswith("--from") for w in words):
            continue
        sources = [w for w in words[1:-1] if not w.startswith("--")]
        copied |= {s.strip("./").split("/")[0] for s in sources}
    return copied


def test_dockerfile_copies_every_package_the_commands_need(ours: dict[str, Service]) -> None:
    entry_points = []
    for service in ours.values():
        module = argv(service)[2]
        entry_points += [module, f"{module}.__main__"]
    needed = first_party_closure(entry_points)
    assert {"services", "shared", "infra"} <= needed  # the walk itself works
    copied = dockerfile_copies()
    assert needed <= copied, f"infra/Dockerfile does not copy {sorted(needed - copied)}"
    assert {"pyproject.toml", "constraints.txt"} <= copied


def test_dockerfile_runs_offline() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert re.search(r"\bHF_HUB_OFFLINE=1\b", text)
    assert "-c constraints.txt" in text


def _listeners(value: str) -> dict[str, tuple[str, int]]:
    result = {}
    for entry in value.split(","):
        name, _, address = entry.strip().partition("://")
        host, _, port = address.rpartition(":")
        result[name] = (host, int(port))
    return result


def test_kafka_bootstrap_points_at_the_kafka_listener(
    compose: dict[str, Any], ours: dict[str, Service]
) -> None:
    services = compose["services"]
    for name, service in ours.items():
        bootstrap = environment(service).get("KAFKA_BOOTSTRAP_SERVERS")
        assert bootstrap, f"{name}: KAFKA_BOOTSTRAP_SERVERS is not set"
        for address in bootstrap.split(","):
            host, _, port = address.rpartition(":")
            assert host in services, f"{name}: {host} is not a compose service"
            kafka = environment(services[host])
            controllers = set(kafka.get("KAFKA_CONTROLLER_LISTENER_NAMES", "").split(","))
            advertised = _listeners(kafka["KAFKA_ADVERTISED_LISTENERS"])
            listening = _listeners(kafka["KAFKA_LISTENERS"])
            match = [n for n, addr in advertised.items() if addr == (host, int(port))]
            assert match, f"{name}: {address} is not advertised by {host}"
            assert match[0] not in controllers
            assert listening[match[0]][1] == int(port), f"{host} listens on another port"


def test_kafka_host_listener_is_published(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    advertised = _listeners(environment(kafka)["KAFKA_ADVERTISED_LISTENERS"])
    host_ports = {
        (host, port) for host, port in advertised.values() if host in {"localhost", "127.0.0.1"}
    }
    assert host_ports, "no listener advertised for clients on the host"
    # "HOST_PORT:CONTAINER_PORT", optionally after a host IP.
    published = {tuple(str(p).split(":")[-2:]) for p in kafka["ports"]}
    for _, port in host_ports:
        assert (str(port), str(port)) in published, f"host listener {port} is not published"


def test_qdrant_url_points_at_the_qdrant_service(
    compose: dict[str, Any], ours: dict[str, Service]
) -> None:
    for name, service in ours.items():
        url = environment(service).get("QDRANT_URL")
        if url is None:
            continue
        match = re.fullmatch(r"http://([\w.-]+):(\d+)/?", url)
        assert match, f"{name}: QDRANT_URL {url!r} is not http://host:port"
        target = compose["services"].get(match[1])
        assert target is not None, f"{name}: {match[1]} is not a compose service"
        assert str(target["image"]).startswith("qdrant/qdrant:")
        assert match[2] == "6333"


def test_health_checks_look_for_the_ready_file(ours: dict[str, Service]) -> None:
    for spec in SERVICES:
        check = ours[spec.name].get("healthcheck")
        assert check, f"{spec.name} has no health check"
        var_dir = Path("VAR")
        relative = Settings(var_dir=var_dir).ready_file(spec.name).relative_to(var_dir)
        test = check["test"]
        command = test if isinstance(test, str) else " ".join(test)
        assert f"$$REELSTREAM_VAR_DIR/{relative}" in command


CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def test_the_image_holds_the_trained_models_and_cpu_torch(ours: dict[str, Service]) -> None:
    assert "models" in dockerfile_copies(), "without models/ the services run the baselines"
    ignored = {
        line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
    }
    assert "models" not in ignored
    assert any((ROOT / "models").rglob("weights.safetensors")), "no checkpoint in models/ to copy"
    assert re.search(
        rf'^ARG TORCH_INDEX_URL="{re.escape(CPU_TORCH_INDEX)}"$', DOCKERFILE.read_text(), re.M
    )
    for service in ours.values():
        assert service["build"]["args"]["TORCH_INDEX_URL"].endswith(f"-{CPU_TORCH_INDEX}}}")


def test_docker_compose_accepts_the_file() -> None:
    """`docker compose config` where a Docker client with the compose plugin exists."""
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
        != 0
    ):
        pytest.skip("no `docker compose` on this machine")
    done = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
        env={**os.environ, "INGEST_TOKEN": "test-token"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
