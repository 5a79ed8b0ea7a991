"""Generated protobuf and gRPC stubs for the contracts in ``proto/`` (do not edit by hand)."""
