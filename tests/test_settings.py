"""Settings come from the environment, with the documented names and defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.settings import ConfigError, Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_defaults_match_the_contract() -> None:
    settings = Settings.from_env({})
    assert settings.rabbitmq_url == "amqp://guest:guest@localhost:5672/"
    assert (settings.host, settings.port) == ("0.0.0.0", 8080)
    assert settings.model_concurrency == 100
    assert settings.max_body_bytes == 1_048_576
    assert settings.predictor == ""
    assert settings.result_ttl_s == 86_400
    assert settings.shutdown_grace_s == 30
    assert settings.max_wait_s == 60


def test_values_are_read_and_converted_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "PORT": "9000",
            "MODEL_DELAY_MIN_S": "0.05",
            "MODEL_DELAY_MAX_S": "0.2",
            "LOG_LEVEL": "debug",
            "LOG_FORMAT": "JSON",
            "UNRELATED": "x",
        }
    )
    assert settings.port == 9000
    assert (settings.model_delay_min_s, settings.model_delay_max_s) == (0.05, 0.2)
    assert (settings.log_level, settings.log_format) == ("DEBUG", "json")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PORT": "eighty"}, "PORT"),
        ({"MODEL_CONCURRENCY": "0"}, "MODEL_CONCURRENCY"),
        (
            {"MODEL_DELAY_MIN_S": "5", "MODEL_DELAY_MAX_S": "1"},
            "MODEL_DELAY_MIN_S=5 must not exceed MODEL_DELAY_MAX_S=1$",
        ),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        (
            {"MAX_BODY_BYTES": "1.5"},
            r"^invalid setting MAX_BODY_BYTES='1.5': expected a whole number >= 1$",
        ),
        (
            {"LOG_LEVEL": "verbose"},
            r"^invalid setting LOG_LEVEL='verbose': "
            r"expected one of DEBUG, INFO, WARNING, ERROR \(in any case\)$",
        ),
        ({"LOG_FORMAT": " XML"}, r"^invalid setting LOG_FORMAT=' XML': expected one of text, json"),
        (
            {"PORT": "eighty"},
            r"^invalid setting PORT='eighty': expected a whole number from 0 to 65535$",
        ),
        (
            {"PUBLISH_BATCH_MAX": "0"},
            r"PUBLISH_BATCH_MAX='0': expected a whole number from 1 to 1000$",
        ),
        ({"PUBLISH_TIMEOUT_S": "0"}, r"PUBLISH_TIMEOUT_S='0': expected a finite number > 0$"),
        ({"MAX_WAIT_S": "-1"}, r"MAX_WAIT_S='-1': expected a finite number >= 0$"),
        ({"BROKER_NAMESPACE": ""}, r"BROKER_NAMESPACE='': expected 1 to 100 letters, digits,"),
        ({"BROKER_NAMESPACE": "ns-ü"}, r"BROKER_NAMESPACE='ns-ü': expected 1 to 100 letters,"),
        ({"BROKER_NAMESPACE": "a b"}, r"BROKER_NAMESPACE='a b': expected 1 to 100 letters,"),
        ({"BROKER_NAMESPACE": "n" * 101}, r"BROKER_NAMESPACE='n+': expected 1 to 100 letters,"),
        ({"STREAM_PREFETCH": "70000"}, r"STREAM_PREFETCH='70000': expected a whole number from 1"),
        ({"MODEL_CONCURRENCY": "65536"}, r"MODEL_CONCURRENCY='65536': expected .* to 65535$"),
        (
            {"WEBHOOK_ENDPOINT_CONCURRENCY": "1" + "0" * 23},
            r"WEBHOOK_ENDPOINT_CONCURRENCY='10+': expected a whole number from 1 to 65535$",
        ),
        (
            {"SHUTDOWN_GRACE_S": "inf"},
            r"^invalid setting SHUTDOWN_GRACE_S='inf': expected a finite",
        ),
        ({"RESULT_TTL_S": "Infinity"}, r"RESULT_TTL_S='Infinity': expected a finite number > 0$"),
        ({"MODEL_DELAY_MIN_S": "0", "MODEL_DELAY_MAX_S": "inf"}, "MODEL_DELAY_MAX_S"),
        ({"RABBITMQ_URL": "localhost:5672"}, "RABBITMQ_URL must start with amqp://"),
        ({"RABBITMQ_URL": "amqp://a,,amqp://b"}, "RABBITMQ_URL's entry 2 of 3 is empty"),
        ({"RABBITMQ_URL": "amqp://a, http://b"}, "entry 2 of 2 must start with amqp://"),
        ({"RABBITMQ_URL": "amqp://a,"}, "RABBITMQ_URL's entry 2 of 2 is empty"),
        ({"RABBITMQ_URL": "amqp://h:port/"}, r"RABBITMQ_URL is not a valid URL \(.*port"),
        ({"RABBITMQ_URL": "amqp://a,amqp://h:99999/"}, "entry 2 of 2 is not a valid URL"),
        ({"RABBITMQ_URL": "amqp://u:p@[::1/"}, "RABBITMQ_URL is not a valid URL"),
        ({"RABBITMQ_URL": "amqp://"}, "RABBITMQ_URL names no host"),
        ({"RABBITMQ_URL": "amqp://a,amqp://u:p@:5672/"}, "entry 2 of 2 names no host"),
        ({"RABBITMQ_URL": "amqp://a,amqp://a b/"}, "entry 2 of 2 has a host that is not"),
        ({"RABBITMQ_URL": "amqp://a/,amqp://b/other"}, "entries name different vhosts"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_setting(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        Settings.from_env(env)
    assert "\n" not in str(info.value)


def test_readme_documents_every_setting() -> None:
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", README.read_text(), re.MULTILINE))
    assert documented == {name.upper() for name in Settings.__struct_fields__}


@pytest.mark.parametrize(
    "url",
    [
        "AMQP://guest:guest@Broker-1.example:5672/",  # schemes and hosts are case-blind
        "amqp://a:5672,amqp://b/,amqp://c/%2F",  # "/" three ways: one vhost
        "amqps://u:p@[::1]:5671/prod,amqps://u:p@10.0.0.2:5671/prod",
    ],
)
def test_broker_urls_that_are_fine_are_taken(url: str) -> None:
    assert Settings.from_env({"RABBITMQ_URL": url}).rabbitmq_url == url
