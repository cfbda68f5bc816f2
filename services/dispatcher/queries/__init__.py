"""Read-only queries over the dispatcher's tables, for its HTTP API."""
