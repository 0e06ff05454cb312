"""Deployment as code, reviewed by the suite: the azd template (azure.yaml + infra/*.bicep) against the
resource list of the design, least-privilege role assignments, app settings against what the code
reads, module parameters, and the Sentinel workbook's queries against the table's columns.
The Bicep is compiled only where a Bicep CLI exists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.paths import ROOT

INFRA = ROOT / "infra"
WORKBOOK = ROOT / "deploy" / "sentinel" / "workbook.json"

ROLES = {
    "Azure Event Hubs Data Receiver": "a638d3c7-ab3a-418d-83e6-5f17a39d4fde",
    "Storage Blob Data Contributor": "ba92f5b4-2d11-453d-a403-e96b0029c9fe",
    "Storage Table Data Contributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "Monitoring Metrics Publisher": "3913510d-42f4-4e42-8a64-420c390055eb",
    "Microsoft Sentinel Responder": "3e150937-b8fe-4cfb-8069-0eaf05ecd056",
}
BROAD_ROLES = {
    "Owner": "8e3af657-a8ff-443c-a75c-2fe8c4bcb635",
    "Contributor": "b24988ac-6180-42a0-ab88-20f7382dd24c",
    "Storage Blob Data Owner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "Azure Event Hubs Data Owner": "f526a384-b230-433a-b45c-95f59c4a2dec",
}


# -- a small reader of the Bicep we write (declarations and brace-matched bodies) -----------------


def _body(text: str, start: int) -> str:
    depth = 0
    for index in range(start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[start : index + 1]
    raise AssertionError("unbalanced braces")


def resources(text: str) -> dict[str, tuple[str, str]]:
    """symbolic name -> (type without api version, body)"""
    out = {}
    for match in re.finditer(r"^resource (\w+) '([^'@]+)@[^']+'(?: existing)? = (?:if \([^)]*\) )?\{", text, re.M):
        out[match.group(1)] = (match.group(2), _body(text, match.end() - 1))
    return out


def modules(text: str) -> dict[str, tuple[str, str]]:
    out = {}
    for match in re.finditer(r"^module (\w+) '([^']+)' = \{", text, re.M):
        out[match.group(1)] = (match.group(2), _body(text, match.end() - 1))
    return out


def params(text: str) -> dict[str, bool]:
    """declared param -> has a default"""
    return {m.group(1): m.group(2) is not None for m in re.finditer(r"^param (\w+) [\w.]+( = .+)?$", text, re.M)}


def variables(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^var (\w+) = '([^']*)'", text, re.M)}


def all_bicep() -> dict[Path, str]:
    return {path: path.read_text() for path in sorted(INFRA.rglob("*.bicep"))}


def all_resources() -> dict[str, tuple[str, str, Path]]:
    out = {}
    for path, text in all_bicep().items():
        for name, (kind, body) in resources(text).items():
            out[f"{path.stem}.{name}"] = (kind, body, path)
    return out


def test_azure_yaml_deploys_this_folder_as_a_python_function_app():
    text = (ROOT / "azure.yaml").read_text()
    assert re.search(r"^services:\n  pipeline:\n    project: \.\n    language: python\n    host: function$", text, re.M)
    assert re.search(r"^infra:\n  provider: bicep\n  path: infra$", text, re.M)
    assert (INFRA / "main.bicep").exists() and (INFRA / "main.parameters.json").exists()
    parameters = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    declared = params((INFRA / "main.bicep").read_text())
    assert set(parameters) <= set(declared)
    assert {name for name, has_default in declared.items() if not has_default} <= set(parameters)
    # azd finds the app to deploy to by this tag
    (app,) = [body for kind, body, _ in all_resources().values() if kind == "Microsoft.Web/sites"]
    assert "'azd-service-name': 'pipeline'" in app


def test_every_resource_of_the_design_is_declared():
    kinds = {kind for kind, _, _ in all_resources().values()}
    assert {
        "Microsoft.Web/serverfarms",
        "Microsoft.Web/sites",
        "Microsoft.EventHub/namespaces",
        "Microsoft.EventHub/namespaces/eventhubs",
        "Microsoft.EventHub/namespaces/eventhubs/consumergroups",
        "Microsoft.Storage/storageAccounts",
        "Microsoft.ManagedIdentity/userAssignedIdentities",
        "Microsoft.Insights/dataCollectionEndpoints",
        "Microsoft.Insights/dataCollectionRules",
        "Microsoft.OperationalInsights/workspaces",
        "Microsoft.OperationalInsights/workspaces/tables",
        "Microsoft.Insights/components",
        "Microsoft.Insights/workbooks",
    } <= kinds
    found = all_resources()
    (plan,) = [body for kind, body, _ in found.values() if kind == "Microsoft.Web/serverfarms"]
    assert "name: 'FC1'" in plan and "tier: 'FlexConsumption'" in plan
    (app,) = [body for kind, body, _ in found.values() if kind == "Microsoft.Web/sites"]
    assert "functionAppConfig" in app and "name: 'python'" in app and "type: 'UserAssigned'" in app
    assert "type: 'UserAssignedIdentity'" in app  # the deployment package is read with the identity too
    (account,) = [body for kind, body, _ in found.values() if kind == "Microsoft.Storage/storageAccounts"]
    assert "allowSharedKeyAccess: false" in account


def test_role_assignments_are_the_five_of_the_design_each_on_the_narrowest_scope():
    """Four always; Microsoft Sentinel Responder on the workspace only when incident write-back is on."""
    assignments = []
    conditions = {}
    for _path, text in all_bicep().items():
        found = resources(text)
        names = variables(text)
        for _name, (kind, body) in found.items():
            if kind != "Microsoft.Authorization/roleAssignments":
                continue
            role_var = re.search(r"roleDefinitions', (\w+)\)", body).group(1)
            scope = re.search(r"^\s*scope: (\w+)$", body, re.M).group(1)
            assert "principalType: 'ServicePrincipal'" in body and "principalId: principalId" in body
            assignments.append((names[role_var], found[scope][0]))
            declaration = re.search(rf"^resource {_name} '[^']+' = (if \(([^)]*)\) )?\{{", text, re.M)
            conditions[names[role_var]] = declaration.group(2)
    assert sorted(assignments) == sorted(
        [
            (ROLES["Azure Event Hubs Data Receiver"], "Microsoft.EventHub/namespaces/eventhubs"),  # the hub, not the namespace
            (ROLES["Storage Blob Data Contributor"], "Microsoft.Storage/storageAccounts"),
            (ROLES["Storage Table Data Contributor"], "Microsoft.Storage/storageAccounts"),
            (ROLES["Monitoring Metrics Publisher"], "Microsoft.Insights/dataCollectionRules"),  # the rule, not the group
            (ROLES["Microsoft Sentinel Responder"], "Microsoft.OperationalInsights/workspaces"),  # the workspace, not the group
        ]
    )
    assert conditions[ROLES["Microsoft Sentinel Responder"]] == "enableSentinel && enableIncidentWriteback"
    assert {role for role, condition in conditions.items() if condition is None} == set(ROLES.values()) - {ROLES["Microsoft Sentinel Responder"]}
    everything = "".join(all_bicep().values())
    for role, guid in BROAD_ROLES.items():
        assert guid not in everything, f"{role} is broader than the design allows"


def test_module_parameters_match_their_declarations():
    for path, text in all_bicep().items():
        for name, (relative, body) in modules(text).items():
            target = (path.parent / relative).resolve()
            assert target.exists(), f"{path.name}: module {name} -> {relative} does not exist"
            declared = params(target.read_text())
            block = re.search(r"params: \{(.*)\}", body, re.S).group(1)
            given = set(re.findall(r"^\s{4}(\w+):", block, re.M))
            assert given <= set(declared), f"{name}: unknown params {given - set(declared)}"
            missing = {p for p, has_default in declared.items() if not has_default} - given
            assert not missing, f"{name}: required params not given: {missing}"


def test_app_settings_cover_what_the_code_reads():
    (app,) = [body for kind, body, _ in all_resources().values() if kind == "Microsoft.Web/sites"]
    settings = set(re.findall(r"\{ name: '([^']+)', value:", app))
    local = set(json.loads((ROOT / "local.settings.sample.json").read_text())["Values"])
    # Flex Consumption sets the runtime in functionAppConfig and refuses FUNCTIONS_WORKER_RUNTIME;
    # worker indexing is the default; AzureWebJobsStorage is identity-based (__accountName, ...).
    local_only = {"FUNCTIONS_WORKER_RUNTIME", "AzureWebJobsFeatureFlags", "AzureWebJobsStorage"}
    # Settings of the optional sinks of pipeline/samples/azure.toml (ITSM, fan-out, pseudonymised lake): set
    # them as app settings (secrets as Key Vault references) when those sinks are enabled.
    local_only |= {"SNOW_INSTANCE_URL", "SNOW_CLIENT_ID", "SNOW_CLIENT_SECRET", "SNOW_ASSIGNMENT_GROUP", "JIRA_SITE_URL", "JIRA_EMAIL", "JIRA_API_TOKEN",
                   "FANOUT_EVENTHUB_NAMESPACE", "LAKE_PSEUDONYM_KEY"}
    assert local - local_only <= settings, local - local_only - settings
    assert {"AzureWebJobsStorage__accountName", "AzureWebJobsStorage__credential", "AzureWebJobsStorage__clientId", "APPLICATIONINSIGHTS_CONNECTION_STRING"} <= settings
    assert not settings & {"FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_EXTENSION_VERSION", "AzureWebJobsStorage"}
    trigger = (ROOT / "pipeline" / "entrypoints" / "functions.py").read_text()
    for name in ("EventHubName", "EventHubConsumerGroup"):
        assert f"%{name}%" in trigger
    assert 'connection="EventHubConnection"' in trigger


def table_columns() -> dict[str, str]:
    """The columns the Bicep creates: it loads them from the Sentinel sink's table definition."""
    text = (INFRA / "modules" / "monitoring.bicep").read_text()
    assert "loadJsonContent('../../deploy/sentinel/table.json', '$.properties.schema.columns')" in text
    table = json.loads((ROOT / "deploy" / "sentinel" / "table.json").read_text())
    return {c["name"]: c["type"] for c in table["properties"]["schema"]["columns"]}


def test_table_definition_is_the_one_the_sentinel_sink_writes():
    from pipeline.deliver.sinks.sentinel_schema import table_schema

    assert json.loads((ROOT / "deploy" / "sentinel" / "table.json").read_text()) == table_schema()


def test_dcr_stream_table_and_columns_follow_the_shared_naming():
    text = (INFRA / "modules" / "monitoring.bicep").read_text()
    assert "var tableName = 'DLPEnrichedAlerts_CL'" in text and "var streamName = 'Custom-DLPEnrichedAlerts'" in text
    assert "outputStream: 'Custom-${tableName}'" in text and "dataCollectionEndpointId: dce.id" in text
    columns = table_columns()
    assert columns["TimeGenerated"] == "datetime" and columns["RecordId"] == "string"
    assert not {"TenantId", "Title", "Type", "id"} & set(columns)  # reserved column names in Log Analytics
    assert "loadTextContent('../../deploy/sentinel/workbook.json')" in text and WORKBOOK.exists()


def test_bicep_compiles_where_a_bicep_cli_exists(tmp_path):
    bicep = shutil.which("bicep")
    az = shutil.which("az")
    if bicep is None and az is None:
        pytest.skip("no Bicep CLI on this machine (neither `bicep` nor `az bicep`); PyPI and npm offer no package that provides it, and it cannot be downloaded here. The structural review tests above still run.")
    command = [bicep, "build"] if bicep else [az, "bicep", "build", "--file"]
    result = subprocess.run([*command, str(INFRA / "main.bicep"), "--outdir", str(tmp_path)], capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    template = json.loads((tmp_path / "main.json").read_text())
    assert template["$schema"].endswith("subscriptionDeploymentTemplate.json#")


# -- the Sentinel workbook ----------------------------------------------------------------------------


def queries(workbook: dict) -> list[tuple[str, str]]:
    out = []
    for item in workbook["items"]:
        content = item["content"]
        if item["type"] == 3:
            out.append((item["name"], content["query"]))
        if item["type"] == 9:
            out.extend((p["name"], p["query"]) for p in content["parameters"] if "query" in p)
    return out


def test_workbook_is_a_notebook_whose_queries_use_existing_columns():
    workbook = json.loads(WORKBOOK.read_text())
    assert workbook["version"] == "Notebook/1.0"
    names = [item["name"] for item in workbook["items"]]
    assert len(names) == len(set(names))
    found = queries(workbook)
    titles = " ".join(item["content"].get("title", "") for item in workbook["items"] if item["type"] == 3).lower()
    for topic in ("policy", "users", "sensitive", "triage"):
        assert topic in titles
    columns = set(table_columns())
    parameters = {p["name"] for item in workbook["items"] if item["type"] == 9 for p in item["content"]["parameters"]}
    for name, query in found:
        assert query.startswith("DLPEnrichedAlerts_CL\n"), name
        for parameter in re.findall(r"\{(\w+)(?::\w+)?\}", query):
            assert parameter in parameters, f"{name}: unknown parameter {parameter}"
        text = re.sub(r'"[^"]*"', '""', re.sub(r"\{[^}]*\}", "", query))
        defined = set(re.findall(r"\b([A-Z]\w*)\s*=(?!=)", text))
        used = set(re.findall(r"(?<![.\w'\"])([A-Z]\w*)\b", text)) - {"DLPEnrichedAlerts_CL"}
        unknown = used - columns - defined
        assert not unknown, f"{name}: {sorted(unknown)} are neither columns of DLPEnrichedAlerts_CL nor defined in the query"


def test_the_column_check_catches_a_typo():
    columns = set(table_columns())
    text = "DLPEnrichedAlerts_CL\n| summarize Alerts = dcount(AlertId) by PolicyNmae"
    used = set(re.findall(r"(?<![.\w'\"])([A-Z]\w*)\b", text)) - {"DLPEnrichedAlerts_CL"}
    assert used - columns - {"Alerts"} == {"PolicyNmae"}


def test_local_settings_sample_lists_every_variable_the_example_configs_read():
    """Every `${NAME}` and `*_env = "NAME"` of the shipped configs is an app setting in local.settings.sample.json."""
    local = set(json.loads((ROOT / "local.settings.sample.json").read_text())["Values"])
    for config in ("pipeline/samples/pipeline.toml", "pipeline/samples/azure.toml", "deploy/function.toml"):
        text = (ROOT / config).read_text()
        names = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text)) | set(re.findall(r'_env\s*=\s*"([A-Z_][A-Z0-9_]*)"', text))
        assert names <= local, f"{config} reads {sorted(names - local)}, missing from local.settings.sample.json"


def test_the_deployed_config_builds_with_the_app_settings_the_template_sets(monkeypatch, tmp_path):
    """deploy/function.toml (the app's DLP_PIPELINE_CONFIG) reads only settings infra/ defines, and builds."""
    import asyncio

    from pipeline.config import load_config
    from pipeline.runner import Runner

    (app,) = [body for kind, body, _ in all_resources().values() if kind == "Microsoft.Web/sites"]
    settings = set(re.findall(r"\{ name: '([^']+)', value:", app))
    text = (ROOT / "deploy" / "function.toml").read_text()
    assert set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text)) <= settings
    assert "param pipelineConfig string = 'deploy/function.toml'" in (INFRA / "main.bicep").read_text()
    for name, value in {
        "DLP_STORAGE_BLOB_URL": "https://account.blob.core.windows.net",
        "DLP_STORAGE_TABLE_URL": "https://account.table.core.windows.net",
        "DLP_SENTINEL_DCE_ENDPOINT": "https://dcr-x.westeurope-1.ingest.monitor.azure.com",
        "DLP_SENTINEL_DCR_IMMUTABLE_ID": "dcr-00000000000000000000000000000000",
        "DLP_PIPELINE_DATA_DIR": str(tmp_path),
    }.items():
        monkeypatch.setenv(name, value)
    runner = Runner(load_config(ROOT / "deploy" / "function.toml"))
    try:
        assert runner.chain.names == ["sensitive_info", "user_context", "prior_incidents", "triage"]
        assert {entry.name: type(getattr(sink, "inner", sink)).__name__ for entry, sink in runner.sinks} == {"sentinel": "SentinelSink", "lake": "BlobLakeSink"}
        assert type(runner.dead_letter).__name__ == "BlobDeadLetterStore"
        # State every instance shares: pending parts and claims, and the activities sensitive_info correlates with
        assert type(runner.state).__name__ == "TableStateStore" and runner.state.settings.account_url == "https://account.table.core.windows.net"
        stores = {slot.name: type(slot.plugin.store).__name__ for wave in runner.chain.waves for slot in wave if hasattr(slot.plugin, "store")}
        assert stores == {"sensitive_info": "TableHistoryStore", "prior_incidents": "TableHistoryStore"}
    finally:
        asyncio.run(runner.aclose())


def test_shared_state_of_the_deployed_config_is_in_the_app_storage_account_whose_roles_the_identity_has():
    """Every Table and Blob store of deploy/function.toml is reached through the app settings that name the
    template's storage account, and the identity holds the data role for each service on that account."""
    import tomllib

    config = tomllib.loads((ROOT / "deploy" / "function.toml").read_text())
    tables = [config["state"]] + [e["settings"]["store"] for e in config["enrichers"] if "store" in e.get("settings", {})]
    assert all(store["kind"] == "azure_table" and store["account_url"] == "${DLP_STORAGE_TABLE_URL}" for store in tables) and len(tables) == 3
    blobs = [config["dead_letter"]] + [s["settings"] for s in config["sinks"] if s["kind"] == "blob"]
    assert all(store["account_url"] == "${DLP_STORAGE_BLOB_URL}" for store in blobs)
    (app,) = [body for kind, body, _ in all_resources().values() if kind == "Microsoft.Web/sites"]
    assert "{ name: 'DLP_STORAGE_TABLE_URL', value: 'https://${storageAccountName}.table.${environment().suffixes.storage}' }" in app
    assert "{ name: 'DLP_STORAGE_BLOB_URL', value: 'https://${storageAccountName}.blob.${environment().suffixes.storage}' }" in app
    main = (INFRA / "main.bicep").read_text()
    assert "storageAccountName: storage.outputs.name" in main and "principalId: identity.outputs.principalId" in modules(main)["storage"][1]
    storage = (INFRA / "modules" / "storage.bicep").read_text()
    names = variables(storage)
    granted = set()
    for _name, (kind, body) in resources(storage).items():
        if kind == "Microsoft.Authorization/roleAssignments" and re.search(r"^\s*scope: account$", body, re.M):
            granted.add(names[re.search(r"roleDefinitions', (\w+)\)", body).group(1)])
    assert {ROLES["Storage Table Data Contributor"], ROLES["Storage Blob Data Contributor"]} <= granted


def test_table_dcr_and_workbook_tell_the_alerts_time_from_the_processing_time():
    """TimeGenerated is the alert's time; the processing time is its own column, in the table the Bicep
    creates, in the DCR stream, in the dedup function and in the workbook's latest-revision queries."""
    columns = table_columns()
    assert columns["TimeGenerated"] == "datetime" and columns["ProcessedTime"] == "datetime" and columns["LifecycleState"] == "string"
    dcr = json.loads((ROOT / "deploy" / "sentinel" / "dcr.json").read_text())
    assert {c["name"]: c["type"] for c in dcr["properties"]["streamDeclarations"]["Custom-DLPEnrichedAlerts"]["columns"]} == columns
    function = (ROOT / "deploy" / "sentinel" / "DLPEnrichedAlerts.kql").read_text()
    assert "| summarize arg_max(ProcessedTime, *) by RecordId" in function
    workbook = dict(queries(json.loads(WORKBOOK.read_text())))
    assert "arg_max(ProcessedTime," in workbook["top-users"] and "arg_max(TimeGenerated," not in workbook["top-users"]
    assert "LifecycleState" in workbook["dlp-lifecycle"]
