-- Meterline store, version 4: time-partitioned usage_hourly, and resource_spans.
--
-- One migration, two layouts with the same columns and keys (ADR 0003):
-- * the `timescaledb` extension is installed (or can be created here): usage_hourly and
--   resource_spans become hypertables (7-day chunks), usage_hourly gets the continuous
--   aggregates usage_daily and usage_monthly, refresh policies and a compression policy
--   (chunks older than 30 days); retention is a setting (PgStore.set_usage_retention);
-- * otherwise both tables are natively range-partitioned by month (UTC) with a DEFAULT
--   partition as a safety net; the store creates the month partitions it needs before it
--   writes (meterline_ensure_month_partitions below).

-- Which partition of `parent` holds [month, month + 1 month): create the missing month
-- partitions for the given instants (any instant of a month names that month, UTC).
-- Rows of such a month that already sit in the DEFAULT partition move into the new one.
-- Concurrent callers for one parent queue on an advisory lock. Returns how many were created.
CREATE FUNCTION meterline_ensure_month_partitions(parent text, instants timestamptz[])
RETURNS integer
LANGUAGE plpgsql AS $fn$
DECLARE
    key_column text;
    default_part text;
    lo timestamptz;
    hi timestamptz;
    part text;
    created integer := 0;
BEGIN
    SELECT a.attname INTO key_column
    FROM pg_partitioned_table p
    JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]
    WHERE p.partrelid = to_regclass(parent);
    IF key_column IS NULL THEN
        RAISE EXCEPTION 'meterline_ensure_month_partitions: % is not a partitioned table', parent;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('meterline_partitions:' || parent));
    default_part := parent || '_default';
    FOR lo IN
        SELECT DISTINCT date_trunc('month', x, 'UTC') FROM unnest(instants) AS x ORDER BY 1
    LOOP
        part := parent || '_p' || to_char(lo AT TIME ZONE 'UTC', 'YYYY_MM');
        CONTINUE WHEN to_regclass(part) IS NOT NULL;
        hi := ((lo AT TIME ZONE 'UTC') + INTERVAL '1 month') AT TIME ZONE 'UTC';
        EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                       part, parent);
        IF to_regclass(default_part) IS NOT NULL THEN
            -- Wait for writers that still route rows of this month to DEFAULT; the DELETE
            -- below then sees what they committed (READ COMMITTED: a new snapshot).
            EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE', default_part);
            EXECUTE format(
                'WITH moved AS (DELETE FROM %I WHERE %I >= $1 AND %I < $2 RETURNING *) '
                'INSERT INTO %I SELECT * FROM moved',
                default_part, key_column, key_column, part) USING lo, hi;
        END IF;
        EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                       parent, part, lo, hi);
        created := created + 1;
    END LOOP;
    RETURN created;
END
$fn$;

-- Turn an ordinary table into one range-partitioned by month on key_column, with the same
-- columns, keys, indexes and checks, a DEFAULT partition, and its rows moved over.
CREATE FUNCTION meterline_partition_by_month(tbl text, key_column text)
RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    old_table text := tbl || '_unpartitioned';
    index_name text;
    months timestamptz[];
BEGIN
    EXECUTE format('ALTER TABLE %I RENAME TO %I', tbl, old_table);
    -- Free the index and key names, so that the new table's get the usual ones.
    FOR index_name IN
        SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE i.indrelid = to_regclass(old_table)
    LOOP
        EXECUTE format('ALTER INDEX %I RENAME TO %I', index_name, index_name || '_old');
    END LOOP;
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING ALL) PARTITION BY RANGE (%I)',
                   tbl, old_table, key_column);
    EXECUTE format('CREATE TABLE %I PARTITION OF %I DEFAULT', tbl || '_default', tbl);
    EXECUTE format('SELECT array_agg(DISTINCT date_trunc(''month'', %I, ''UTC'')) FROM %I',
                   key_column, old_table) INTO months;
    PERFORM meterline_ensure_month_partitions(tbl, coalesce(months, '{}'));
    EXECUTE format('INSERT INTO %I SELECT * FROM %I', tbl, old_table);
    EXECUTE format('DROP TABLE %I', old_table);
END
$fn$;

-- Which subscription and plan a resource belonged to, from span_start until span_end
-- (half-open; NULL: still open). Written by the catalog side; rating resolves through it.
CREATE TABLE resource_spans (
    resource_id     text COLLATE "C" NOT NULL,
    subscription_id text COLLATE "C" NOT NULL,
    plan_id         text COLLATE "C" NOT NULL,
    span_start      timestamptz      NOT NULL,
    span_end        timestamptz,
    PRIMARY KEY (resource_id, span_start),
    CHECK (span_end IS NULL OR span_end > span_start)
);
CREATE INDEX resource_spans_span_start_idx ON resource_spans (span_start);

DO $$
DECLARE
    use_timescale boolean := EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb');
BEGIN
    IF NOT use_timescale
       AND EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS timescaledb;
            use_timescale := true;
        EXCEPTION WHEN OTHERS THEN
            -- Installed but not loadable (e.g. not in shared_preload_libraries).
            RAISE NOTICE 'timescaledb is available but could not be created (%); '
                         'using native monthly partitions', SQLERRM;
        END;
    END IF;

    IF NOT use_timescale THEN
        PERFORM meterline_partition_by_month('usage_hourly', 'hour_start');
        PERFORM meterline_partition_by_month('resource_spans', 'span_start');
        RETURN;
    END IF;

    PERFORM create_hypertable('usage_hourly', by_range('hour_start', INTERVAL '7 days'),
                              migrate_data => true);
    PERFORM create_hypertable('resource_spans', by_range('span_start', INTERVAL '7 days'),
                              migrate_data => true);

    -- Per UTC day and per UTC month, refreshed by policy (and on demand with
    -- CALL refresh_continuous_aggregate). Real-time aggregation stays off: the views show
    -- what was materialised; usage_hourly is the truth the invoicer reads.
    EXECUTE $v$
        CREATE MATERIALIZED VIEW usage_daily WITH (timescaledb.continuous) AS
        SELECT subscription_id, meter,
               time_bucket(INTERVAL '1 day', hour_start, 'UTC') AS day_start,
               sum(quantity) AS quantity, max(quantity_max) AS quantity_max,
               sum(sample_count) AS sample_count
        FROM usage_hourly
        GROUP BY subscription_id, meter, day_start
        WITH NO DATA
    $v$;
    EXECUTE $v$
        CREATE MATERIALIZED VIEW usage_monthly WITH (timescaledb.continuous) AS
        SELECT subscription_id, meter,
               time_bucket(INTERVAL '1 month', hour_start, 'UTC') AS month_start,
               sum(quantity) AS quantity, max(quantity_max) AS quantity_max,
               sum(sample_count) AS sample_count
        FROM usage_hourly
        GROUP BY subscription_id, meter, month_start
        WITH NO DATA
    $v$;
    PERFORM add_continuous_aggregate_policy('usage_daily',
        start_offset => INTERVAL '62 days', end_offset => NULL,
        schedule_interval => INTERVAL '1 hour');
    PERFORM add_continuous_aggregate_policy('usage_monthly',
        start_offset => INTERVAL '3 months', end_offset => NULL,
        schedule_interval => INTERVAL '1 day');

    -- Old chunks compress; late rows may still upsert into them (TimescaleDB >= 2.11).
    ALTER TABLE usage_hourly SET (
        timescaledb.compress,
        timescaledb.compress_segmentby = 'subscription_id, meter',
        timescaledb.compress_orderby = 'hour_start'
    );
    PERFORM add_compression_policy('usage_hourly', compress_after => INTERVAL '30 days');
END
$$;
