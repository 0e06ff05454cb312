"""Build DLP alerts as a source would send them (Graph alerts_v2 shape), for enricher tests."""

from __future__ import annotations

import time
from typing import Any

import orjson
from azure.core.credentials import AccessToken

from pipeline.ingest.message import Message


def graph_alert(
    alert_id: str,
    *,
    upn: str | None = None,
    object_id: str | None = None,
    policy: str = "Finance PII",
    created: str = "2025-03-14T09:12:44Z",
    sits: str | None = None,
    file_name: str | None = "report.xlsx",
    workload: str = "SharePoint",
    severity: str = "medium",
) -> dict[str, Any]:
    evidence: list[dict[str, Any]] = []
    if upn or object_id:
        evidence.append(
            {
                "@odata.type": "#microsoft.graph.security.userEvidence",
                "roles": ["policyViolator"],
                "userAccount": {"userPrincipalName": upn, "azureAdUserId": object_id, "displayName": None},
            }
        )
    if file_name:
        evidence.append({"@odata.type": "#microsoft.graph.security.fileEvidence", "fileDetails": {"fileName": file_name, "filePath": "https://contoso.sharepoint.com/sites/x"}})
    extra: dict[str, Any] = {"PolicyName": policy, "Workload": workload}
    if sits:
        extra["SensitiveInformationTypes"] = sits
    return {
        "@odata.type": "#microsoft.graph.security.alert",
        "id": alert_id,
        "serviceSource": "dataLossPrevention",
        "title": f"DLP policy ({policy} rule) matched for document ({file_name}) in {workload}",
        "severity": severity,
        "status": "new",
        "createdDateTime": created,
        "additionalData": extra,
        "evidence": evidence,
    }


def message(*alerts: dict[str, Any]) -> Message:
    return Message(body=orjson.dumps(list(alerts)), source="test")


class StaticCredential:
    """Implements azure-core's async credential interface (`get_token`), as tests may inject."""

    def __init__(self) -> None:
        self.calls = 0
        self.scopes: list[tuple[str, ...]] = []

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.calls += 1
        self.scopes.append(scopes)
        return AccessToken("test-token", int(time.time()) + 3600)

    async def close(self) -> None:
        return None
