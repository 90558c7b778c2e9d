"""monitoring: Prometheus metrics for pretraining workers (`training`) and dataprep (`dataprep`),
the exporter and file_sd target lists they share (`exporter`); alongside, the Grafana dashboard
and provisioning (grafana/), prometheus.yml and a docker compose file. Imports neither Ray nor
DeepSpeed at module level."""
