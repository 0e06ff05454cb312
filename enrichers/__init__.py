"""Built-in enrichers, one module each. The framework loads them by name from this table, exactly as
it loads third-party plugins from the `dlp_pipeline.enrichers` entry point group."""

BUILTIN_ENRICHERS: dict[str, str] = {
    "sensitive_info": "enrichers.sensitive_info:SensitiveInfoEnricher",
    "user_context": "enrichers.user_context:UserContextEnricher",
    "prior_incidents": "enrichers.prior_incidents:PriorIncidentsEnricher",
    "telemetry": "enrichers.telemetry:TelemetryEnricher",
    "triage": "enrichers.triage:TriageEnricher",
}
