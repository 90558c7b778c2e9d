"""monitoring: Prometheus metrics for training and dataprep, Grafana dashboards (issue 6)."""
