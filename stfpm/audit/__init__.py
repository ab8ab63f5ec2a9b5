"""The nightly audit: `run` (arrivals, state, retries, the scoring run), `config` (the YAML),
`summary` (audit.json, alerts, exit codes) and `report` (the static HTML). Builds on stfpm.scoring."""
