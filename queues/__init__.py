"""RabbitMQ queue topology for MegaFlow (see topology.py)."""
