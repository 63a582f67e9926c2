"""All of the connector's SQL: the schema, the engine set-up, dialect switches and the store."""
