-- Meterline store, version 7 (DuckDB): nothing to change. The PostgreSQL schema leaves room
-- on usage_hourly's pages for heap-only updates (fillfactor); DuckDB has no such setting.
SELECT 1;
