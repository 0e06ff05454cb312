"""The posture report over the lake: `python -m pipeline report` (pipeline/entrypoints/commands/report.py).

- `sources`: which files make up the lake (a local folder of JSON lines, JSONL.gz or Parquet, or the
  Blob lake of a config, downloaded to a temporary folder) and a progress line while they are read;
- `query`: the records loaded into an in-memory DuckDB database and the aggregates of the report;
- `render`: one self-contained HTML page (inline CSS and SVG, no script, no fetch of anything).

The report shows what the records hold and nothing else: a pseudonymised user stays a pseudonym (no
directory look-up, no name taken from an enrichment), and no matched value, justification or file
content is read into it.
"""
