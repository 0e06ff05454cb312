"""Message bodies in the shapes a Defender XDR streaming hub really carries (deterministic, no network).

A streaming hub carries every Advanced Hunting table the tenant chose to stream, 100 rows per
message, DLP rows a small fraction of them:

- `mixed_bodies`: 100-row envelopes `{"records": [...]}` of 1–3 KB rows of DeviceEvents,
  DeviceProcessEvents, DeviceNetworkEvents, EmailEvents (with a `Subject` key), CloudAppEvents (not
  DLP), IdentityLogonEvents and AlertInfo / AlertEvidence rows of other products, with Windows paths
  (`C:\\Users\\…`, escaped backslashes in the JSON). A fraction of the rows are DLP: whole split
  alerts (one AlertInfo and three AlertEvidence rows from the bundled sample) placed in one envelope.
- `dense_bodies`: 100-row envelopes that hold 25 split DLP alerts each (DLP-dense).

The bodies are what `orjson.dumps` writes, as the Streaming API sends them (backslashes escaped, no
`\\u` escapes).
"""

from __future__ import annotations

import copy
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

SAMPLES = Path(__file__).resolve().parent.parent / "pipeline" / "samples" / "messages"
ROWS_PER_MESSAGE = 100
ROWS_PER_ALERT = 4  # one AlertInfo and three AlertEvidence rows
TENANT = "11111111-2222-3333-4444-555555555555"


def _dlp_rows() -> list[dict[str, Any]]:
    sample = json.loads((SAMPLES / "01-defender-streaming-batch.json").read_text())
    return sample["records"][:ROWS_PER_ALERT]


def dlp_alert_rows(alert_id: str, user: str) -> list[dict[str, Any]]:
    """The four rows of one split DLP alert (the bundled sample's), for `alert_id` and `user`."""
    rows = copy.deepcopy(_DLP_ROWS)
    for row in rows:
        row["properties"]["AlertId"] = alert_id
    evidence = rows[1]["properties"]
    evidence["AccountUpn"], evidence["AccountName"] = f"{user}@contoso.com", user
    return rows


def _filler(rng: random.Random, size: int) -> str:
    words = ("contoso", "fabrikam", "svc", "update", "policy", "cache", "sync", "agent", "report", "temp")
    out: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(words)
        out.append(word)
        length += len(word) + 1
    return " ".join(out)


def _path(rng: random.Random, user: str) -> str:
    folder = rng.choice(("AppData\\Local\\Temp", "Documents\\Finance", "Downloads", "AppData\\Roaming\\Microsoft\\Teams", "Desktop"))
    return f"C:\\Users\\{user}\\{folder}\\{rng.choice(('setup', 'report', 'q1', 'update', 'data'))}{rng.randrange(1000)}.{rng.choice(('exe', 'xlsx', 'dll', 'ps1'))}"


def _row(rng: random.Random, index: int) -> dict[str, Any]:
    """One non-DLP row of a table picked by `index`, 1–3 KB once serialised."""
    user = f"user{rng.randrange(5000):04d}"
    stamp = f"2025-03-14T09:{rng.randrange(60):02d}:{rng.randrange(60):02d}.{rng.randrange(10**7):07d}Z"
    device = {"DeviceId": f"{rng.getrandbits(160):040x}", "DeviceName": f"wks-{rng.randrange(9999):04d}.contoso.com"}
    kind = index % 8
    pad = rng.randrange(400, 1800)
    properties: dict[str, Any]
    if kind == 0:
        category = "AdvancedHunting-DeviceEvents"
        properties = {
            **device, "Timestamp": stamp, "ActionType": rng.choice(("AntivirusScanCompleted", "UsbDriveMounted", "ScriptContent")),
            "FileName": "powershell.exe", "FolderPath": _path(rng, user), "InitiatingProcessAccountName": user,
            "InitiatingProcessCommandLine": f"\"C:\\Windows\\System32\\WindowsPowerShell\\v1.0\\powershell.exe\" -File {_path(rng, user)}",
            "AdditionalFields": orjson.dumps({"ScanTypeIndex": 2, "Path": _path(rng, user), "Note": _filler(rng, pad // 2)}).decode(),
        }
    elif kind == 1:
        category = "AdvancedHunting-DeviceProcessEvents"
        properties = {
            **device, "Timestamp": stamp, "ActionType": "ProcessCreated", "FileName": "cmd.exe",
            "FolderPath": "C:\\Windows\\System32\\cmd.exe", "ProcessCommandLine": f"cmd.exe /c copy {_path(rng, user)} \\\\fs01\\share\\{user}",
            "AccountName": user, "AccountDomain": "contoso", "SHA256": f"{rng.getrandbits(256):064x}",
            "InitiatingProcessFolderPath": _path(rng, user), "InitiatingProcessCommandLine": _filler(rng, pad),
        }
    elif kind == 2:
        category = "AdvancedHunting-DeviceNetworkEvents"
        properties = {
            **device, "Timestamp": stamp, "ActionType": "ConnectionSuccess", "RemoteIP": f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}",
            "RemotePort": 443, "RemoteUrl": f"https://{rng.choice(('cdn', 'api', 'login'))}.example.com/{_filler(rng, 40).replace(' ', '/')}",
            "InitiatingProcessFolderPath": _path(rng, user), "InitiatingProcessFileName": "msedge.exe", "Protocol": "Tcp",
            "AdditionalFields": orjson.dumps({"direction": "Outbound", "conn_state": "SF", "history": _filler(rng, pad)}).decode(),
        }
    elif kind == 3:
        category = "AdvancedHunting-EmailEvents"
        properties = {
            "Timestamp": stamp, "NetworkMessageId": f"{rng.getrandbits(128):032x}", "SenderFromAddress": f"{user}@contoso.com",
            "RecipientEmailAddress": f"partner{rng.randrange(99)}@fabrikam.com", "Subject": f"RE: {_filler(rng, 60)}",
            "EmailDirection": "Outbound", "DeliveryAction": "Delivered", "AttachmentCount": rng.randrange(3),
            "AuthenticationDetails": orjson.dumps({"SPF": "pass", "DKIM": "pass", "DMARC": "pass", "CompAuth": "pass"}).decode(),
            "ConfidenceLevel": orjson.dumps({"Phish": "Low", "Spam": "Low", "Note": _filler(rng, pad)}).decode(),
        }
    elif kind == 4:
        category = "AdvancedHunting-CloudAppEvents"
        raw = {"CreationTime": stamp[:19], "Operation": rng.choice(("FileAccessed", "FileModified", "MailItemsAccessed")), "RecordType": 6,
               "UserId": f"{user}@contoso.com", "Workload": "SharePoint", "ObjectId": f"https://contoso.sharepoint.com/sites/fin/{_filler(rng, pad)}"}
        properties = {"Timestamp": stamp, "ActionType": raw["Operation"], "Application": "Microsoft SharePoint Online",
                      "AccountDisplayName": user, "RawEventData": orjson.dumps(raw).decode()}
    elif kind == 5:
        category = "AdvancedHunting-IdentityLogonEvents"
        properties = {
            **device, "Timestamp": stamp, "ActionType": rng.choice(("LogonSuccess", "LogonFailed")), "LogonType": "Interactive",
            "AccountName": user, "AccountDomain": "CONTOSO", "AccountUpn": f"{user}@contoso.com", "Protocol": "Kerberos",
            "AdditionalFields": orjson.dumps({"Spns": f"krbtgt/CONTOSO.COM {_filler(rng, pad)}", "Pass-through": "false"}).decode(),
        }
    else:
        # Alerts of other products: AlertInfo / AlertEvidence rows that are not DLP.
        product = rng.choice(("Microsoft Defender for Endpoint", "Microsoft Defender for Office 365", "Microsoft Defender for Identity"))
        category = "AdvancedHunting-AlertInfo" if kind == 6 else "AdvancedHunting-AlertEvidence"
        properties = {
            "Timestamp": stamp, "AlertId": f"da{rng.getrandbits(96):024x}", "Title": f"Suspicious activity on {device['DeviceName']}",
            "Category": "Execution", "Severity": "Medium", "ServiceSource": product, "DetectionSource": "EDR",
            "EntityType": "File", "FileName": "payload.ps1", "FolderPath": _path(rng, user),
            "AdditionalFields": orjson.dumps({"Description": _filler(rng, pad)}).decode(),
        }
    return {"time": stamp, "tenantId": TENANT, "operationName": "Publish", "category": category, "properties": properties}


def mixed_bodies(messages: int, dlp_fraction: float, *, users: int = 200, seed: int = 11) -> list[bytes]:
    """`messages` envelopes of 100 rows, `dlp_fraction` of all rows DLP (whole split alerts).

    The DLP alerts are spread over the messages at random, each one whole in one message (at 1 %,
    about one message in four holds one)."""
    rng = random.Random(seed)
    alerts = round(messages * ROWS_PER_MESSAGE * dlp_fraction / ROWS_PER_ALERT)
    holders = [rng.randrange(messages) for _ in range(alerts)]
    per_message = [0] * messages
    for holder in holders:
        per_message[holder] += 1
    bodies = []
    alert_number = 0
    for index in range(messages):
        rows = []
        for _ in range(per_message[index]):
            rows.extend(dlp_alert_rows(f"dl{seed:04d}{alert_number:08d}-mixed", f"user{rng.randrange(users):04d}"))
            alert_number += 1
        while len(rows) < ROWS_PER_MESSAGE:
            rows.insert(rng.randrange(len(rows) + 1), _row(rng, rng.randrange(8)))
        bodies.append(orjson.dumps({"records": rows}))
    return bodies


def mixed_alerts(bodies: list[bytes]) -> int:
    """How many DLP alerts `mixed_bodies` put into `bodies`."""
    return sum(body.count(b'"AdvancedHunting-AlertInfo","_TimeReceivedBySvc"') for body in bodies)


def dense_bodies(messages: int, *, users: int = 200, seed: int = 13) -> list[bytes]:
    """`messages` envelopes of 100 rows, each 25 split DLP alerts (four rows each)."""
    rng = random.Random(seed)
    bodies = []
    per_message = ROWS_PER_MESSAGE // ROWS_PER_ALERT
    for index in range(messages):
        rows = []
        for number in range(per_message):
            rows.extend(dlp_alert_rows(f"dl{seed:04d}{index:06d}{number:02d}-dense", f"user{rng.randrange(users):04d}"))
        bodies.append(orjson.dumps({"records": rows}))
    return bodies


_DLP_ROWS = _dlp_rows()


# --- measurement: floor and pipeline in turns -------------------------------------------------

def in_turns(floor: Callable[[], float], pipeline: Callable[[], float], rounds: int) -> float:
    """Median over `rounds` of floor seconds ÷ pipeline seconds (each callable returns the seconds it
    measured), the two measured in turns (A B A B …), so that a slow spell of a shared machine falls
    on both sides of each ratio."""
    ratios = []
    for _ in range(rounds):
        floor_seconds = floor()
        ratios.append(floor_seconds / pipeline())
    return statistics.median(ratios)


def loads_seconds(bodies: list[bytes]) -> float:
    """Seconds of `orjson.loads` of every body: the floor of the mixed stream."""
    loads = orjson.loads
    started = time.perf_counter()
    for body in bodies:
        loads(body)
    return time.perf_counter() - started


def loads_dumps_seconds(bodies: list[bytes]) -> float:
    """Seconds of `orjson.loads` then `orjson.dumps` of every body: the floor of the DLP-dense path."""
    loads, dumps = orjson.loads, orjson.dumps
    started = time.perf_counter()
    for body in bodies:
        dumps(loads(body))
    return time.perf_counter() - started
