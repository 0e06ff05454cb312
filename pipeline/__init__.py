"""DLP alert enrichment pipeline: the framework (formats, assembly, enricher chain, sinks, runner).

It never imports a concrete enricher: built-ins live in the top-level `enrichers` package and are
loaded by name like third-party plugins.
"""

__version__ = "0.1.0"
