-- Meterline store, version 8: usage_sources is time-partitioned like usage_hourly.
--
-- It grows with the usage (one row per hour row and write), so it follows usage_hourly's
-- layout: a TimescaleDB hypertable (7-day chunks) that the usage retention setting prunes
-- together with usage_hourly (PgStore.set_usage_retention), or native monthly partitions
-- created on demand, which are dropped month by month like usage_hourly's. Same columns
-- and index; the rows already there move over.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
       AND to_regclass('usage_hourly') NOT IN (SELECT partrelid FROM pg_partitioned_table) THEN
        PERFORM create_hypertable('usage_sources', by_range('hour_start', INTERVAL '7 days'),
                                  migrate_data => true);
    ELSE
        PERFORM meterline_partition_by_month('usage_sources', 'hour_start');
    END IF;
END
$$;
