"""Worker entry points, one module per pool: ``celery -A workers.<pool> worker``."""
