"""The decoders the decode loop knows, by name, and the order it asks them in.

Every format module registers its decoder when imported; importing `pipeline.ingest.formats`
imports the built-in ones, so the registry always holds them.

Detection order. The first decoder that says yes takes the body or the record:
1. the whole parsed body is offered to every decoder (`envelope_rows`): a Defender Streaming API
   envelope `{"records": [...]}` is taken whatever else the body holds; a body of Graph incidents
   (one, a list or a `{"value": [...]}` page, with their `alerts`) is `graph_alert`'s envelope;
2. otherwise the body's records (a list, a `{"value": [...]}` page, or the body itself when it is one
   object) are offered one by one (`owns_record`), in the order `DETECTION_ORDER` gives:
   `graph_alert`, then `sentinel_alert`, then `management_activity`. It matters where a record
   matches more than one: a Graph alert that also has a Sentinel `Type` is a Graph alert, a
   Sentinel row that also has Management Activity's `Operation` and `CreationTime` is a Sentinel alert.
Formats that are not built in (a plugin's, a test's) are asked after the built-ins, in the order
they were registered, so they never take a record a built-in format owns.
"""

from __future__ import annotations

from pipeline.errors import PipelineError
from pipeline.ingest.formats.contract import Decoder

# The built-in formats, in the order they are asked (see the module docstring). A new built-in
# format adds its name here and to `pipeline.models.SourceFormat`.
DETECTION_ORDER: tuple[str, ...] = ("defender_streaming", "graph_alert", "sentinel_alert", "management_activity")


class UnknownFormat(PipelineError, LookupError):
    """No decoder is registered under the name asked for."""


_registered: dict[str, Decoder] = {}
_in_order: tuple[Decoder, ...] = ()


def register(decoder: Decoder) -> Decoder:
    """Add `decoder` under its name; a name has one decoder, so a second one is refused (ValueError)."""
    if decoder.name in _registered:
        raise ValueError(f"format '{decoder.name}' already has a decoder ({type(_registered[decoder.name]).__qualname__}); unregister it first")
    _registered[decoder.name] = decoder
    _reorder()
    return decoder


def unregister(name: str) -> None:
    """Remove the decoder of format `name` (raises `UnknownFormat` when there is none)."""
    lookup(name)
    del _registered[name]
    _reorder()


def lookup(name: str) -> Decoder:
    """The decoder of format `name`; `UnknownFormat` names the registered formats when there is none."""
    try:
        return _registered[name]
    except KeyError:
        raise UnknownFormat(
            f"no decoder is registered for format '{name}'; registered formats: {', '.join(names())}. "
            "Check the name, or import the module that registers it."
        ) from None


def decoders() -> tuple[Decoder, ...]:
    """Every registered decoder, in detection order."""
    return _in_order


def names() -> tuple[str, ...]:
    """The registered formats' names, in detection order."""
    return tuple(decoder.name for decoder in _in_order)


def _reorder() -> None:
    global _in_order
    built_in = [_registered[name] for name in DETECTION_ORDER if name in _registered]
    others = [decoder for name, decoder in _registered.items() if name not in DETECTION_ORDER]
    _in_order = (*built_in, *others)
