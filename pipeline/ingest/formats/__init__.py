"""The input formats: one module per format, each defining a decoder and registering it when imported.

- `contract.py`: what a format provides (`Decoder`), what it reports to (`RecordOutput`), and the
  types it returns (`AlertPart`);
- `registry.py`: the registered decoders, by name, and the order the decode loop asks them in;
- `common.py`: the helpers decoders share (normalising values, removing matched content);
- `defender_streaming.py`, `graph_alert.py`, `management_activity.py`, `sentinel_alert.py`: the formats.

The decode loop that uses them is pipeline/ingest/decode.py. Importing this package registers the
built-in formats.
"""

# Importing the format modules registers their decoders.
from pipeline.ingest.formats import common, contract, defender_streaming, graph_alert, management_activity, registry, sentinel_alert
from pipeline.ingest.formats.contract import AlertPart, Decoder, RecordOutput

__all__ = [
    "AlertPart",
    "Decoder",
    "RecordOutput",
    "common",
    "contract",
    "defender_streaming",
    "graph_alert",
    "management_activity",
    "registry",
    "sentinel_alert",
]
