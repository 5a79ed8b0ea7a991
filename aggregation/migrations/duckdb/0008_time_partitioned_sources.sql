-- Meterline store, version 8 (DuckDB): nothing to change. The PostgreSQL schema partitions
-- usage_sources by time like usage_hourly; DuckDB has no table partitions.
SELECT 1;
