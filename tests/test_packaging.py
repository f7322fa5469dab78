"""The Dockerfile and compose file, checked as far as this machine allows.

No Docker engine runs here, so: lint the Dockerfile with hadolint, parse
the compose file, and replay the Dockerfile's COPY and pip install steps
into a fresh virtualenv, then start the service from it and run the
image's HEALTHCHECK command against it.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.settings import Settings
from tests.support import REPO, settings_env, settings_for_test, wait_ready_at

DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    pairs = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, arguments = line.strip().partition(" ")
            pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return loaded


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, str(DOCKERFILE)], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_runs_the_service_unprivileged_with_a_healthcheck() -> None:
    instructions = dict(_instructions())
    assert instructions["FROM"].startswith("python:3.11-slim")
    assert instructions["USER"] not in ("root", "0")
    assert json.loads(instructions["CMD"]) == ["python", "-m", "service"]
    assert "/readyz" in instructions["HEALTHCHECK"]
    assert instructions["EXPOSE"] == "8080"


def test_compose_wires_the_app_to_a_healthy_broker() -> None:
    services = _compose()["services"]
    broker, app = services["rabbitmq"], services["app"]
    assert broker["image"].startswith("rabbitmq:")
    assert broker["healthcheck"]["test"]
    assert any(volume.endswith(":/var/lib/rabbitmq") for volume in broker["volumes"])
    assert broker["hostname"]  # a stable node name keeps the volume's data
    assert app["build"] == "."
    assert app["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert app["environment"]["RABBITMQ_URL"].startswith("amqp://")
    assert "@rabbitmq:5672" in app["environment"]["RABBITMQ_URL"]
    assert "8080:8080" in app["ports"]
    assert "rabbitmq-data" in _compose()["volumes"]


def test_compose_keeps_the_app_state_dir_on_a_volume_the_app_can_write() -> None:
    compose = _compose()
    app = compose["services"]["app"]
    state_dir = app["environment"]["STATE_DIR"]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in app["volumes"]}
    assert mounts[state_dir] in compose["volumes"]  # named: survives a rebuild
    # A new named volume takes the owner of the image's directory.
    run = " ".join(arguments for instruction, arguments in _instructions() if instruction == "RUN")
    assert f"mkdir -p {state_dir}" in run
    assert f"chown 10001:10001 {state_dir}" in run
    user = [arguments for instruction, arguments in _instructions() if instruction == "USER"]
    assert user == ["10001"]


def test_dockerignore_keeps_the_build_context_to_what_copy_needs() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "tests", "bench/results", "**/__pycache__"} <= ignored
    copied = [
        source
        for instruction, arguments in _instructions()
        if instruction == "COPY"
        for source in shlex.split(arguments)[:-1]
    ]
    assert copied and not [source for source in copied if source.rstrip("/") in ignored]


def test_compose_healthcheck_follows_port_as_the_image_does() -> None:
    test = _compose()["services"]["app"]["healthcheck"]["test"]
    image = json.loads(dict(_instructions())["HEALTHCHECK"].split("CMD", 1)[1])
    assert test == ["CMD", *image]
    assert "os.environ.get('PORT', '8080')" in test[-1]


def test_compose_credentials_match_the_broker_user() -> None:
    services = _compose()["services"]
    user = services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_USER"]
    password = services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_PASS"]
    assert f"//{user}:{password}@" in services["app"]["environment"]["RABBITMQ_URL"]


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A fresh venv holding exactly what the Dockerfile installs, and its WORKDIR."""
    root = tmp_path_factory.mktemp("image")
    workdir = root / "app"
    workdir.mkdir()
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for instruction, arguments in _instructions():
        if instruction == "COPY":
            *sources, destination = shlex.split(arguments)
            for source in sources:
                _copy(REPO / source, workdir / destination, source)
        elif instruction == "RUN":
            install = arguments.split("&&")[0].split()
            assert install[:2] == ["pip", "install"], install
            subprocess.run(
                [str(venv / "bin" / "python"), "-m", *install],
                cwd=workdir,
                check=True,
                capture_output=True,
                timeout=600,
            )
    return venv, workdir


def _copy(source: Path, destination: Path, name: str) -> None:
    # `COPY a b ./` copies into a folder; `COPY service ./service` names the target.
    if destination.is_dir():
        destination = destination / Path(name).name
    if source.is_dir():
        shutil.copytree(source, destination, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy(source, destination)


async def test_dockerfile_install_steps_give_a_working_service(
    image_venv: tuple[Path, Path], rabbitmq_url: str
) -> None:
    venv, workdir = image_venv
    python = str(venv / "bin" / "python")
    settings: Settings = settings_for_test(rabbitmq_url)
    env = settings_env(settings)
    # Run from a directory without the repo, so only the installed package can load.
    process = subprocess.Popen([python, "-m", "service"], env=env, cwd=workdir.parent)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.port}") as client:
            await wait_ready_at(client, timeout_s=30)
            answer = await client.post("/predict", json={"input": "from the image"})
            assert answer.json()["input"] == "from the image"
        healthcheck = json.loads(dict(_instructions())["HEALTHCHECK"].split("CMD", 1)[1])
        healthcheck[0] = python
        probe = subprocess.run(healthcheck, check=False, env=env, capture_output=True, timeout=10)
        assert probe.returncode == 0, probe.stderr
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_image_installs_only_the_pinned_versions(image_venv: tuple[Path, Path]) -> None:
    venv, _ = image_venv
    frozen = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "freeze"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    installed = {line for line in frozen if not line.startswith("prediction-service")}
    constraints = (REPO / "constraints.txt").read_text().splitlines()
    pinned = {line for line in constraints if line and not line.startswith("#")}
    assert installed, "pip freeze listed nothing"
    assert installed - pinned == set()
