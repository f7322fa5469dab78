"""docker-compose.cluster.yml, checked as far as a machine without Docker allows.

It is parsed as Compose does (YAML with merge keys) and its wiring is
checked: three RabbitMQ nodes that find each other and share one cookie
from the environment, three replicas that name every node (their own
first), and a balancer that sends requests only to ready replicas.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from service.settings import Settings
from tests.support import REPO

NODES = ["rabbitmq-1", "rabbitmq-2", "rabbitmq-3"]
APPS = ["app-1", "app-2", "app-3"]


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.cluster.yml").read_text())
    return loaded


def _config(name: str) -> str:
    content: str = _compose()["configs"][name]["content"]
    return content


def test_three_nodes_discover_each_other_and_share_one_cookie() -> None:
    services = _compose()["services"]
    conf = _config("rabbitmq-conf")
    assert "peer_discovery_backend = classic_config" in conf
    for number, node in enumerate(NODES, 1):
        service = services[node]
        assert service["hostname"] == node  # the node name rabbit@<hostname> is stable
        assert f"classic_config.nodes.{number} = rabbit@{node}" in conf
        assert service["healthcheck"]["test"][:2] == ["CMD", "rabbitmq-diagnostics"]
        assert any(v.endswith(":/var/lib/rabbitmq") for v in service["volumes"])
        environment = service["environment"]
        for variable in ("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "RABBITMQ_CTL_ERL_ARGS"):
            # The cookie comes from .env or the shell, and compose refuses to start without it.
            assert re.search(r"-setcookie \$\{RABBITMQ_ERLANG_COOKIE:\?", environment[variable])
    assert len({services[node]["volumes"][0] for node in NODES}) == 3


def test_each_replica_names_every_node_its_own_first_and_keeps_its_state() -> None:
    services = _compose()["services"]
    firsts = []
    for app in APPS:
        service = services[app]
        settings = Settings.from_env(service["environment"])
        hosts = [re.search(r"@([^:/]+)", url)[1] for url in settings.rabbitmq_urls]  # type: ignore[index]
        assert sorted(hosts) == NODES
        firsts.append(hosts[0])
        assert settings.state_dir and any(
            v.endswith(f":{settings.state_dir}") for v in service["volumes"]
        )
        assert set(service["depends_on"]) == set(NODES)
        assert all(d["condition"] == "service_healthy" for d in service["depends_on"].values())
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
    assert sorted(firsts) == NODES  # spread: each node is some replica's first


def test_the_balancer_sends_requests_only_to_ready_replicas() -> None:
    services = _compose()["services"]
    balancer = services["load-balancer"]
    assert balancer["ports"] == ["8080:8080"]
    assert set(balancer["depends_on"]) == set(APPS)
    assert all("ports" not in services[app] for app in APPS)  # reached through it only
    cfg = _config("haproxy-cfg")
    assert "option httpchk GET /readyz" in cfg
    assert "http-check expect status 200" in cfg
    for app in APPS:
        assert f"server {app} {app}:8080" in cfg
    # Longer than a sync prediction (17 s) and a long poll (MAX_WAIT_S, 60 s).
    seconds = int(re.search(r"timeout server (\d+)s", cfg)[1])  # type: ignore[index]
    assert seconds > 60
