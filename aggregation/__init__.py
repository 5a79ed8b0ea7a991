"""The store: schema and migrations, PostgreSQL and DuckDB adapters, usage queries."""
