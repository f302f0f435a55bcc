"""ops/: the compose file, the env example and the Dockerfile agree with the code.

Docker is not available where the tests run, so the compose file is checked statically:
it is parsed (by a small parser of the plain YAML subset it is written in, and by PyYAML as
well when installed), every service command is parsed by the real `aether` CLI parsers
(down to the worker's own), every variable it sets in an aether container is a Settings
field, and ops/env.example names every setting and only settings, in a form Settings
accepts."""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ledger.config import Settings

ROOT = Path(__file__).parents[2]
OPS = ROOT / "ops"
COMPOSE = OPS / "compose.yaml"
ENV_EXAMPLE = OPS / "env.example"
DOCKERFILE = OPS / "Dockerfile"
SETTINGS_NAMES = {name.upper() for name in Settings.model_fields}

# Values for the compose file's ${...} interpolations (what an operator puts in ops/.env).
INTERPOLATION_SAMPLES = {
    "AETHER_DB_PASSWORD": "s3cret",
    "AETHER_CHECKER_ID": "6f1c1d9e-3b7a-4f55-9a1e-2d2f0b7c8a11",
    "AETHER_GPU_LEASE_ID": "1b4e28ba-2fa1-41d2-883f-0016d3cca427",
    "AETHER_GPU_NODE_ID": "6fa459ea-ee8a-4ca4-894e-db77e160355e",
    "AETHER_GPU_KEY_SEED_HEX": "11" * 32,
}


# -- a parser of the plain YAML subset compose.yaml is written in --------------------------


class PlainYamlError(ValueError):
    pass


def _strip_comment(line: str) -> str:
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _scalar(text: str, where: int) -> Any:
    if text.startswith('"'):
        return json.loads(text)
    if text.startswith("'"):
        if not text.endswith("'") or len(text) < 2:
            raise PlainYamlError(f"line {where}: unterminated quote: {text}")
        return text[1:-1].replace("''", "'")
    if text.startswith("["):
        value = json.loads(text)  # the flow lists are JSON arrays of strings
        if not all(isinstance(v, str) for v in value):
            raise PlainYamlError(f"line {where}: a flow list of anything but strings: {text}")
        return value
    if text[0] in "&*|>!{%@`":
        raise PlainYamlError(f"line {where}: outside the plain subset: {text}")
    if text in ("true", "false"):
        return text == "true"
    if text in ("null", "~"):
        return None
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return text


def _split_key(text: str, where: int) -> tuple[str, str]:
    found = re.match(r'^("[^"]*"|[A-Za-z0-9_.\-/]+):(?:\s+(.*))?$', text)
    if not found:
        raise PlainYamlError(f"line {where}: not 'key: value': {text}")
    key = found[1].strip('"')
    return key, (found[2] or "").strip()


def parse_plain_yaml(source: str) -> Any:
    lines = []
    for number, raw in enumerate(source.splitlines(), 1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise PlainYamlError(f"line {number}: a tab in the indentation")
        text = _strip_comment(raw)
        if text.strip():
            lines.append((len(text) - len(text.lstrip(" ")), text.strip(), number))
    position = 0

    def block(indent: int) -> Any:
        nonlocal position
        if lines[position][1].startswith("- ") or lines[position][1] == "-":
            items: list[Any] = []
            while position < len(lines) and lines[position][0] == indent:
                _, text, number = lines[position]
                if not text.startswith("- "):
                    raise PlainYamlError(f"line {number}: a mapping key inside a list")
                item = text[2:].strip()
                if re.match(r'^("[^"]*"|[A-Za-z0-9_.\-/]+):(\s|$)', item):
                    # "- key: value" opens a mapping whose other keys are indented by 2
                    lines[position] = (indent + 2, item, number)
                    items.append(mapping(indent + 2))
                else:
                    position += 1
                    items.append(_scalar(item, number))
            return items
        return mapping(indent)

    def mapping(indent: int) -> dict[str, Any]:
        nonlocal position
        out: dict[str, Any] = {}
        while position < len(lines) and lines[position][0] == indent:
            _, text, number = lines[position]
            if text.startswith("- "):
                raise PlainYamlError(f"line {number}: a list item inside a mapping")
            key, value = _split_key(text, number)
            if key in out:
                raise PlainYamlError(f"line {number}: duplicate key {key}")
            position += 1
            if value:
                out[key] = _scalar(value, number)
            elif position < len(lines) and lines[position][0] > indent:
                out[key] = block(lines[position][0])
            else:
                out[key] = None
        if position < len(lines) and lines[position][0] > indent:
            raise PlainYamlError(f"line {lines[position][2]}: unexpected indentation")
        return out

    document = block(0)
    if position != len(lines):
        raise PlainYamlError(f"line {lines[position][2]}: unexpected dedent")
    return document


def interpolate(text: str) -> str:
    """Compose's ${NAME}, ${NAME:-default} and ${NAME:?message}, from INTERPOLATION_SAMPLES."""

    def value(found: re.Match[str]) -> str:
        name, op, arg = found[1], found[2], found[3]
        if name in INTERPOLATION_SAMPLES:
            return INTERPOLATION_SAMPLES[name]
        if op == ":-":
            return arg
        raise AssertionError(f"${{{name}}} has no default and no sample value")

    return re.sub(r"\$\{([A-Z0-9_]+)(?:(:-|:\?)([^}]*))?\}", value, text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return parse_plain_yaml(COMPOSE.read_text())


def aether_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from ops/Dockerfile."""
    return {
        name: s
        for name, s in compose["services"].items()
        if (s.get("build") or {}).get("dockerfile") == "ops/Dockerfile"
    }


def compose_service_names() -> list[str]:
    return sorted(aether_services(parse_plain_yaml(COMPOSE.read_text())))


# -- the real CLI parsers, without running anything ----------------------------------------


class _Parsed(Exception):  # noqa: N818 (a signal, not an error)
    def __init__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> None:
        self.parser = parser
        self.namespace = namespace


@contextmanager
def parse_only() -> Iterator[None]:
    """The first parse_args call parses for real (SystemExit on bad arguments) and then
    stops the program before it does anything."""
    real = argparse.ArgumentParser.parse_args

    def parse(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise _Parsed(self, real(self, args, namespace))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse)
        yield


def parsed(entry: Callable[[list[str]], object], argv: Sequence[str]) -> _Parsed:
    with parse_only():
        try:
            entry(list(argv))
        except _Parsed as done:
            return done
        except SystemExit as e:
            pytest.fail(f"{' '.join(argv)!r} is refused by the real parser (exit {e.code})")
    raise AssertionError(f"{entry} never parsed its arguments")


def aether_commands() -> set[str]:
    from workers.cli import main

    top = parsed(main, ["demo"]).parser
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def check_command(argv: list[str]) -> None:
    """Parse an `aether ...` command line (after `aether`) the way the program would."""
    from workers.cli import main

    namespace = parsed(main, argv).namespace
    if namespace.command != "worker":
        return
    options = list(namespace.options)
    if namespace.kind == "gpu":
        from workers.gpu_worker import parse_args

        try:
            parse_args(options)  # argparse and the pydantic validation
        except SystemExit as e:
            pytest.fail(f"aether {' '.join(argv)} is refused (exit {e.code})")
        return
    from workers import ingest, processes

    settings = Settings()
    entries: dict[str, Callable[[list[str]], object]] = {
        "ingest": ingest.main,
        "relay": lambda o: processes.run_relay(settings, o),
        "settle": lambda o: processes.run_settle(settings, o),
        "checker": lambda o: processes.run_checker(settings, o),
    }
    parsed(entries[namespace.kind], options)


# -- compose.yaml --------------------------------------------------------------------------


def test_the_compose_file_parses_and_agrees_with_pyyaml_when_installed(compose) -> None:
    assert set(compose) == {"name", "services", "volumes"}
    try:
        import yaml
    except ImportError:
        return
    assert yaml.safe_load(COMPOSE.read_text()) == compose


def test_the_plain_parser_refuses_what_it_does_not_understand() -> None:
    for bad in ("a: &x 1\nb: *x\n", "a: |\n  text\n", "a:\n  - 1\n  b: 2\n", "a: 1\na: 2\n"):
        with pytest.raises(PlainYamlError):
            parse_plain_yaml(bad)
    assert parse_plain_yaml('a:\n  - b: "x # y"\n    c: [ "1" ]\n  - 2\nd:\n') == {
        "a": [{"b": "x # y", "c": ["1"]}, 2],
        "d": None,
    }


def test_kafka_runs_in_kraft_mode_as_broker_and_controller(compose) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    node = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node}@kafka:9093"
    assert "CONTROLLER://:9093" in env["KAFKA_LISTENERS"].split(",")
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert "ZOOKEEPER" not in " ".join(env)
    assert interpolate(env["CLUSTER_ID"])
    assert compose["services"]["postgres"]["image"] == "postgres:16"


def test_every_infrastructure_service_and_the_api_have_a_healthcheck(compose) -> None:
    for name in ("kafka", "postgres", "api"):
        assert compose["services"][name]["healthcheck"]["test"], name


def test_the_stack_has_one_service_per_process(compose) -> None:
    assert set(aether_services(compose)) == {
        "ingest",
        "relay",
        "settle",
        "project",
        "api",
        "chain",
        "checker",
        "gpu",
    }


@pytest.mark.parametrize("name", compose_service_names())
def test_each_service_runs_a_real_command(compose, name) -> None:
    service = compose["services"][name]
    argv = [interpolate(a) for a in (service.get("entrypoint") or ["aether"])]
    argv += [interpolate(a) for a in service.get("command") or []]
    if argv[:3] == ["python", "-m", "workers.chain"]:
        from workers.chain import main as chain_main

        parsed(chain_main, argv[3:])
        return
    assert argv[0] == "aether", argv
    if argv[1] == "api" and "api" not in aether_commands():
        pytest.skip("this tree has no `aether api` yet (workers/api.py)")
    check_command(argv[1:])


@pytest.mark.parametrize("name", compose_service_names())
def test_each_service_sets_only_settings_and_reads_the_env_example(compose, name) -> None:
    service = compose["services"][name]
    environment = service.get("environment") or {}
    assert set(environment) <= SETTINGS_NAMES, set(environment) - SETTINGS_NAMES
    assert interpolate(environment["KAFKA_BOOTSTRAP_SERVERS"]) == "kafka:9092"
    if "DATABASE_URL" in environment or name != "gpu":
        url = interpolate(environment["DATABASE_URL"])
        assert url == "postgresql://aether:s3cret@postgres:5432/aether"
    files = [f["path"] for f in service["env_file"]]
    assert files[0] == "env.example"
    # what the container gets is what Settings accepts
    values = {k: interpolate(v) for k, v in environment.items()}
    Settings(**{k.lower(): v for k, v in values.items()})
    assert service.get("stop_signal") == "SIGINT"


def test_ingest_scales_as_one_consumer_group_within_the_partitions(compose) -> None:
    from workers.broker import HEARTBEATS, USAGE

    ingest = compose["services"]["ingest"]
    replicas = ingest["deploy"]["replicas"]
    assert 1 <= replicas <= min(USAGE.partitions, HEARTBEATS.partitions)
    command = ingest["command"]
    assert command[command.index("--group-id") + 1] == "aether-ingest"


def test_the_postgres_password_is_not_defaulted(compose) -> None:
    password = compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert password.startswith("${AETHER_DB_PASSWORD:?")


# -- env.example ---------------------------------------------------------------------------


def env_example_names() -> tuple[dict[str, str], set[str]]:
    """(the lines that set a value, the names only mentioned as `# NAME=...`)."""
    active: dict[str, str] = {}
    commented: set[str] = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        if found := re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line):
            assert found[1] not in active, f"{found[1]} set twice"
            active[found[1]] = found[2]
        elif found := re.fullmatch(r"# ([A-Z][A-Z0-9_]*)=.*", line):
            commented.add(found[1])
    return active, commented


def test_the_env_example_names_every_setting_and_nothing_else() -> None:
    active, commented = env_example_names()
    named = set(active) | commented
    assert named == SETTINGS_NAMES, (
        f"missing: {SETTINGS_NAMES - named}, unknown: {named - SETTINGS_NAMES}"
    )


def test_each_setting_in_the_env_example_has_a_comment_above_it() -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.fullmatch(r"#? ?[A-Z][A-Z0-9_]*=.*", line) and not line.startswith("# -"):
            above = lines[i - 1]
            assert above.startswith("#"), f"{line} has no comment"


def test_settings_accept_the_env_example_as_it_stands(monkeypatch) -> None:
    for name in SETTINGS_NAMES:
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=ENV_EXAMPLE)  # type: ignore[call-arg]
    assert settings.database_url is None and settings.kafka_bootstrap_servers is None
    assert settings.eth_rpc_url is None and settings.chain_slasher_key is None
    active, _ = env_example_names()
    defaults = Settings.model_fields
    for name, value in active.items():
        field = defaults[name.lower()]
        if value and field.default is not None:
            assert str(field.default) == value, f"{name}={value}, default {field.default}"


# -- the Dockerfile ------------------------------------------------------------------------


def test_the_images_pin_python_and_torch_as_pyproject_does() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", text, re.MULTILINE)
    assert stages == [("python:3.12-slim", "base"), ("base", "gpu")]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_pin = next(
        d for d in pyproject["project"]["optional-dependencies"]["workers"] if d.startswith("torch")
    )
    base, gpu = text.split("FROM base AS gpu")
    instructions = [line for line in base.splitlines() if not line.lstrip().startswith("#")]
    assert not any("torch" in line for line in instructions)  # only the gpu stage has torch
    assert f'"{torch_pin}"' in gpu
