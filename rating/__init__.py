"""Rating: the catalog, the Kafka consumer and the vectorised rating engine."""
