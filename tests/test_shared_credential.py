"""One Azure credential per identity, built once by the runner's services and shared by every client.

The runner is built with a credential factory (a documented argument of `Runner` and `Services`)
that hands out real objects of the azure-core async credential shape and counts what happens to
them; the plugins, stores and SDK clients are the real ones. Nothing here connects anywhere:
building an Azure client makes no network call.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from azure.core.credentials import AccessToken

from pipeline.deadletter.blob import BlobDeadLetterStore
from pipeline.plugins import Services, azure_identity_credential
from pipeline.runner import Runner

IDENTITY = "11111111-2222-3333-4444-555555555555"

CONFIG = f"""
[dead_letter]
kind = "blob"
account_url = "https://deadletters.blob.core.windows.net"

[[enrichers]]
name = "user_context"
[enrichers.settings.graph]
managed_identity_client_id = "{IDENTITY}"

[[enrichers]]
name = "prior_incidents"
[enrichers.settings.store]
kind = "azure_table"
account_url = "https://history.table.core.windows.net"
managed_identity_client_id = "{IDENTITY}"
[enrichers.settings.hunting]
managed_identity_client_id = "{IDENTITY}"

[[enrichers]]
name = "telemetry"
[[enrichers.settings.log_analytics]]
name = "proxy"
workspace_id = "ws-1"
query = "CommonSecurityLog | take 1"
managed_identity_client_id = "{IDENTITY}"

[[sinks]]
name = "sentinel"
kind = "sentinel"
[sinks.settings]
endpoint = "https://dce.westeurope-1.ingest.monitor.azure.com"
rule_id = "dcr-00000000000000000000000000000000"
managed_identity_client_id = "{IDENTITY}"

[[sinks]]
name = "lake"
kind = "blob"
[sinks.settings]
account_url = "https://lake.blob.core.windows.net"
managed_identity_client_id = "{IDENTITY}"

[[sinks]]
name = "stream"
kind = "eventhub"
[sinks.settings]
fully_qualified_namespace = "ns.servicebus.windows.net"
eventhub_name = "enriched"
managed_identity_client_id = "{IDENTITY}"
"""


class CountingCredential:
    """An azure-core async credential that counts its closes."""

    def __init__(self, client_id: str | None) -> None:
        self.client_id = client_id
        self.closes = 0

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("test-token", int(time.time()) + 3600)

    async def close(self) -> None:
        self.closes += 1


def holds(client: Any, target: object, *, depth: int = 8) -> bool:
    """Whether an SDK client keeps `target` somewhere in its attributes (its pipeline's auth policy)."""
    seen: set[int] = set()

    def walk(value: Any, left: int) -> bool:
        if value is target:
            return True
        if left == 0 or id(value) in seen or isinstance(value, (str, bytes, int, float)):
            return False
        seen.add(id(value))
        children = list(value) if isinstance(value, (list, tuple)) else list(getattr(value, "__dict__", {}).values())
        return any(walk(child, left - 1) for child in children)

    return walk(client, depth)


class Factory:
    def __init__(self) -> None:
        self.made: list[CountingCredential] = []

    def __call__(self, client_id: str | None) -> CountingCredential:
        self.made.append(CountingCredential(client_id))
        return self.made[-1]


async def test_every_azure_client_shares_one_credential_per_identity_closed_once_by_the_runner(write_config):
    factory = Factory()
    runner = Runner(write_config(CONFIG), credential_factory=factory)
    await runner.start()
    try:
        assert sorted((c.client_id or "") for c in factory.made) == ["", IDENTITY]  # one per identity, no more
        (identity,) = [c for c in factory.made if c.client_id == IDENTITY]
        (default,) = [c for c in factory.made if c.client_id is None]

        sinks = {entry.name: plugin for entry, plugin in runner.sinks}
        assert sinks["sentinel"].credential is identity and holds(sinks["sentinel"].client, identity)
        assert sinks["lake"].credential is identity and sinks["lake"].service.credential is identity
        assert sinks["stream"].credential is identity and holds(sinks["stream"].producer, identity)

        enrichers = {slot.name: slot.plugin for slot in runner.chain.slots}
        user_context = enrichers["user_context"]
        assert user_context.credential is identity and user_context._token.credential is identity
        prior = enrichers["prior_incidents"]
        assert prior.store.credential is identity and prior.store._client.credential is identity
        assert prior.hunting.credential is identity and prior.hunting._token.credential is identity
        telemetry = enrichers["telemetry"]
        assert telemetry.credential is None  # none given: each query signs in with its identity's shared one
        assert holds(telemetry._logs["proxy"], identity) and not holds(telemetry._logs["proxy"], default)
        assert runner.services.credential(IDENTITY) is identity

        assert isinstance(runner.dead_letter, BlobDeadLetterStore)
        assert runner.dead_letter.container.credential is default  # no identity named: the default one
        assert runner.services.credential() is default and runner.services.credential("") is default
    finally:
        await runner.aclose()
    assert [c.closes for c in factory.made] == [1, 1]  # by the services, after every plugin let go of it


async def test_services_close_every_credential_once_even_when_one_fails_to_close(write_config, caplog):
    class Broken(CountingCredential):
        async def close(self) -> None:
            await super().close()
            raise RuntimeError("socket already gone")

    made: list[CountingCredential] = []

    def factory(client_id: str | None) -> CountingCredential:
        made.append((Broken if client_id == "broken" else CountingCredential)(client_id))
        return made[-1]

    services = Services(state=None, config=write_config(""), clock=time.time, credential_factory=factory)
    assert services.credential("broken") is services.credential("broken")
    services.credential("fine")
    await services.aclose()
    await services.aclose()  # nothing left to close
    assert [(c.client_id, c.closes) for c in made] == [("broken", 1), ("fine", 1)]
    assert "error while closing an Azure credential: RuntimeError" in caplog.text
    assert services.credential("fine") is not made[1]  # after aclose, a new one is made on demand


async def test_the_production_factory_builds_a_managed_identity_for_a_client_id_else_the_default_chain():
    from azure.identity.aio import DefaultAzureCredential, ManagedIdentityCredential

    built = [azure_identity_credential(IDENTITY), azure_identity_credential(None), azure_identity_credential("")]
    try:
        assert [type(c) for c in built] == [ManagedIdentityCredential, DefaultAzureCredential, DefaultAzureCredential]
    finally:
        for credential in built:
            await credential.close()


def test_a_sink_built_without_services_must_be_given_its_credential():
    from pipeline.deliver.sinks.sentinel import SentinelSink

    settings = SentinelSink.Settings(endpoint="https://dce.ingest.monitor.azure.com", rule_id="dcr-1")
    with pytest.raises(ValueError, match="give it a credential"):
        SentinelSink(settings, None)


async def test_the_consumer_signs_in_with_the_runners_default_credential(write_config):
    from pipeline.config import ConsumerSettings
    from pipeline.entrypoints.consumer import build_client

    factory = Factory()
    async with Runner(write_config('[[sinks]]\nname = "lake"\nkind = "jsonl"'), credential_factory=factory) as runner:
        settings = ConsumerSettings(
            fully_qualified_namespace="ns.servicebus.windows.net", eventhub_name="alerts", checkpoint_account_url="https://checkpoints.blob.core.windows.net"
        )
        client = build_client(settings, runner.services.credential)
        try:
            (default,) = factory.made  # the Event Hub client and its checkpoint store share it
            assert default.client_id is None and holds(client, default, depth=10)
        finally:
            await client.close()
        assert default.closes == 0
    assert default.closes == 1
