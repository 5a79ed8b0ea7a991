"""Collectors: the gRPC ingest service, edge validation, the Kafka producer, the agent side."""
