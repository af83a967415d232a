from __future__ import annotations

from pathlib import Path

import pytest

from runtime.settings import ConfigError, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "clients.example.yaml"
ENV = {
    "AUTONOMITE_ADMIN_TOKEN": "admin-token-0123456789",
    "ACME_API_TOKEN": "acme-token-0123456789",
    "ACME_LK_KEY": "acmekey",
    "ACME_LK_SECRET": "acme-secret-which-must-not-leak",
    "GLOBEX_API_TOKEN": "globex-token-0123456789",
    "GLOBEX_LK_KEY": "globexkey",
    "GLOBEX_LK_SECRET": "globex-secret-which-must-not-leak",
}


GATEWAY = "gateway: {host: 127.0.0.1, port: 8080}"  # the example's; runtime.metrics tests add a line after it


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "clients.yaml"
    path.write_text(text)
    return path


def test_the_example_config_loads_with_its_documented_shape():
    settings = load_settings(EXAMPLE, ENV)
    assert [c.id for c in settings.clients] == ["acme", "globex"]
    acme = settings.client("acme")
    assert acme.livekit.api_secret.get_secret_value() == ENV["ACME_LK_SECRET"]
    assert acme.pool.min_idle == 2 and acme.pool.max_size == 8
    assert settings.runtime.scaler.high_water == 0.8
    assert ENV["ACME_LK_SECRET"] not in repr(settings)


def test_metrics_stay_on_the_gateway_unless_a_listener_of_their_own_is_set(tmp_path):
    assert load_settings(EXAMPLE, ENV).runtime.metrics is None  # the default: as before runtime.metrics existed
    path = write(tmp_path, EXAMPLE.read_text().replace(GATEWAY, GATEWAY + "\n  metrics: {host: 10.0.0.5, port: 9464}", 1))
    metrics = load_settings(path, ENV).runtime.metrics
    assert (metrics.host, metrics.port) == ("10.0.0.5", 9464)


def test_a_caller_gets_a_rejoin_grace_by_default_and_it_reaches_the_workers(tmp_path):
    from agent.contract import WorkerConfig

    assert load_settings(EXAMPLE, ENV).runtime.workers.rejoin_grace_s == 10.0
    path = write(tmp_path, EXAMPLE.read_text().replace(GATEWAY, GATEWAY + "\n  workers: {rejoin_grace_s: 2.5}", 1))
    grace = load_settings(path, ENV).runtime.workers.rejoin_grace_s
    env = WorkerConfig("w1", "acme", "acme--w1", 1234, [], rejoin_grace_s=grace).to_env()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**env, "AUTONOMITE_WORKER_ID": "w1"}.items():
            patch.setenv(key, value)
        assert WorkerConfig.from_env().rejoin_grace_s == 2.5


def test_a_missing_variable_names_the_file_the_field_and_the_variable(tmp_path):
    env = {k: v for k, v in ENV.items() if k != "GLOBEX_LK_SECRET"}
    with pytest.raises(ConfigError) as e:
        load_settings(EXAMPLE, env)
    assert str(e.value) == f"{EXAMPLE}: clients[1].livekit.api_secret: environment variable GLOBEX_LK_SECRET is not set"


@pytest.mark.parametrize(
    "change,field,reason",
    [
        (("min_idle: 2, max_size: 8", "min_idle: 9, max_size: 8"), "clients[0].pool", "must not exceed max_size"),
        (("backend: process", "backend: kubernetes"), "runtime.backend", "'process', 'docker' or 'swarm'"),
        (("id: globex", "id: acme"), "clients", "duplicate client id 'acme'"),
        (("url: ws://127.0.0.1:7880", "url: 127.0.0.1:7880"), "clients[0].livekit.url", "should match pattern"),
        (("        voice_id: alloy", "        voice_id: alloy\n        colour: red"), "clients[0].agents[0].colour",
         "Extra inputs"),
        (("high_water: 0.8", "high_water: 0.2"), "runtime.scaler", "low_water must be below high_water"),
        ((GATEWAY, GATEWAY + "\n  metrics: {port: 70000}"), "runtime.metrics.port", "less than or equal to 65535"),
        ((GATEWAY, GATEWAY + "\n  metrics: {host: 127.0.0.1, port: 8080}"), "runtime",
         "metrics.port 8080 is the gateway's; give the metrics listener a port of its own"),
        ((GATEWAY, GATEWAY + "\n  metrics: {host: 'exporter host', port: 9464}"), "runtime.metrics.host", "should match pattern"),
        ((GATEWAY, GATEWAY + "\n  metrics: {host: 127.0.0.1}"), "runtime.metrics.port", "Field required"),
        (("        voice_id: alloy", "        voice_id: alloy\n        end_of_turn_s: 0"), "clients[0].agents[0].end_of_turn_s",
         "greater than or equal to 0.1"),
        ((GATEWAY, GATEWAY + "\n  workers: {rejoin_grace_s: -1}"), "runtime.workers.rejoin_grace_s",
         "greater than or equal to 0"),
        ((GATEWAY, GATEWAY + "\n  workers: {rejoin_grace_s: 601}"), "runtime.workers.rejoin_grace_s",
         "less than or equal to 600"),
        (("        voice_id: alloy", "        voice_id: alloy\n        llm: {provider: openai, api_key: k, first_token_s: 1}"),
         "clients[0].agents[0]", "llm.first_token_s is for the offline llm only"),
        (("        stt: {provider: offline}", "        stt: {provider: offline, first_token_s: 1}"),
         "clients[0].agents[1]", "stt.first_token_s is for the offline llm only"),
    ],
)
def test_invalid_fields_are_rejected_with_path_and_reason(tmp_path, change, field, reason):
    text = EXAMPLE.read_text()
    assert change[0] in text
    path = write(tmp_path, text.replace(change[0], change[1], 1))
    with pytest.raises(ConfigError) as e:
        load_settings(path, ENV)
    message = str(e.value)
    assert message.startswith(f"{path}: {field}: "), message
    assert reason in message


def test_errors_never_echo_a_secret(tmp_path):
    env = {**ENV, "ACME_API_TOKEN": "short"}  # too short: rejected
    with pytest.raises(ConfigError) as e:
        load_settings(EXAMPLE, env)
    assert "clients[0].api_token" in str(e.value) and "short" not in str(e.value).split(": ", 2)[2].replace(
        "at least 16 characters", ""
    )
    env = {**ENV, "GLOBEX_API_TOKEN": ENV["ACME_API_TOKEN"]}
    with pytest.raises(ConfigError) as e:
        load_settings(EXAMPLE, env)
    assert ENV["ACME_API_TOKEN"] not in str(e.value) and "share one api_token" in str(e.value)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read file"):
        load_settings(tmp_path / "missing.yaml", ENV)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "runtime: [unclosed"), ENV)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(write(tmp_path, "- a list"), ENV)


SOURCE = """
runtime: {admin_token: admin-token-0123456789}
clients_source:
  supabase: {url: "http://127.0.0.1:54321", service_key: "${SB_KEY}", poll_interval_s: 5}
"""


def test_a_supabase_source_needs_no_clients_in_the_file(tmp_path):
    settings = load_settings(write(tmp_path, SOURCE), {"SB_KEY": "service-role-jwt"})
    assert settings.clients == [] and settings.clients_source.supabase.table == "clients"
    assert "service-role-jwt" not in repr(settings)


def test_clients_in_the_file_and_a_source_is_an_error_naming_the_field(tmp_path):
    text = SOURCE + "clients: [{id: a}]\n"
    with pytest.raises(ConfigError, match=r"clients\.yaml: clients: give clients here or in clients_source, not both"):
        load_settings(write(tmp_path, text), {"SB_KEY": "k"})


def test_a_bad_source_setting_names_its_field(tmp_path):
    with pytest.raises(ConfigError, match=r"clients_source\.supabase\.table: "):
        load_settings(write(tmp_path, SOURCE.replace("5}", "5, table: Bad-Name}")), {"SB_KEY": "k"})


def test_a_client_is_found_by_id_and_a_copy_with_other_clients_finds_only_its_own():
    from runtime.settings import Settings

    def client(cid: str) -> dict:
        return {"id": cid, "name": cid, "api_token": f"{cid}-" + "t" * 32,
                "livekit": {"url": "ws://127.0.0.1:7880", "api_key": "k", "api_secret": "s" * 32},
                "agents": [{"name": "a", "system_prompt": "p"}]}

    s = Settings.model_validate({"runtime": {"admin_token": "x" * 32}, "clients": [client("a"), client("b")]})
    assert s.client("a").id == "a" and s.client("nope") is None
    fewer = s.model_copy(update={"clients": [s.client("b")]})  # how a reload swaps the clients
    assert fewer.client("a") is None and fewer.client("b").id == "b"
    assert s == s.model_copy()  # the index is no field
