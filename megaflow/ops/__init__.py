"""Operating a MegaFlow cluster: Flower, Prometheus metrics, run reports and the queries they share."""
