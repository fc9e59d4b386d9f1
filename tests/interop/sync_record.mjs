// The real npm `yjs` + `y-websocket` client against fieldsync's /api/v1/yjs endpoint.
//
// Driven by tests/test_yjs_interop.py; runnable by hand against `fieldsync serve`:
//
//   node tests/interop/sync_record.mjs --url ws://127.0.0.1:8080/api/v1/yjs \
//     --record <id> --token-a <jwt> --token-b <jwt> [--bu bu1] [--domain activity] [--timeout-ms 10000]
//
//   node tests/interop/sync_record.mjs --watch priority=HIGH --url ... --record <id> --token-a <jwt>
//
// Default mode: two providers (two Y.Docs) on one record sync through the server only,
// then a type error is repaired by the server on both, then awareness crosses over.
// On success it prints one JSON line {"a": fields, "b": fields, "stats": …} and exits 0.
//
// --watch FIELD=JSON_OR_STRING: one provider; prints {"event":"synced","fields":…} once it
// synced and its own awareness came back from the server, then waits until fields[FIELD]
// equals the value, prints {"event":"seen","fields":…} and exits 0.
//
// Any failure or timeout exits 1 with a message starting "interop:" on stderr.
//
// Stock WebsocketProvider, no patches. Two options matter:
//  - disableBc: true. Without it, two providers of one room in one process share an
//    in-process BroadcastChannel (lib0 publishes synchronously within the "tab") and would
//    sync each other without the server.
//  - WebSocketPolyfill: a subclass of `ws` that only counts frames, to check that the
//    provider does not keep resending after the server echoes its own updates.

import { parseArgs } from 'node:util'
import WebSocket from 'ws'
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'

const { values: opts } = parseArgs({
  options: {
    url: { type: 'string', default: process.env.FIELDSYNC_YJS_URL },
    record: { type: 'string', default: process.env.FIELDSYNC_RECORD },
    'token-a': { type: 'string', default: process.env.FIELDSYNC_TOKEN_A },
    'token-b': { type: 'string', default: process.env.FIELDSYNC_TOKEN_B },
    bu: { type: 'string', default: process.env.FIELDSYNC_BU ?? 'bu1' },
    domain: { type: 'string', default: 'activity' },
    'timeout-ms': { type: 'string', default: '10000' },
    watch: { type: 'string' }
  }
})

const TIMEOUT_MS = Number(opts['timeout-ms'])
const providers = []
/** Frames per provider, counted at the socket (the provider is untouched). */
const stats = {}

const fail = (message) => {
  process.stderr.write(`interop: ${message}\ninterop: frames ${JSON.stringify(stats)}\n`)
  for (const p of providers) {
    try { p.destroy() } catch {}
  }
  process.exit(1)
}

for (const name of ['url', 'record', 'token-a']) {
  if (!opts[name]) fail(`missing --${name}`)
}
if (!opts.watch && !opts['token-b']) fail('missing --token-b')

const countingSocket = (label) => {
  const s = (stats[label] = { sent: 0, received: 0, awareness_received: 0, connections: 0, closes: [] })
  return class CountingWebSocket extends WebSocket {
    constructor (...args) {
      super(...args)
      s.connections++
      this.on('message', (data) => {
        s.received++
        if (new Uint8Array(data)[0] === 1) s.awareness_received++ // y-protocols messageAwareness
      })
      this.on('close', (code, reason) => { s.closes.push([code, reason.toString()]) })
    }

    send (data, ...rest) {
      s.sent++
      return super.send(data, ...rest)
    }
  }
}

const open = (label, token) => {
  const doc = new Y.Doc()
  const provider = new WebsocketProvider(opts.url, `${opts.domain}/${opts.record}`, doc, {
    WebSocketPolyfill: countingSocket(label),
    params: { token, bu: opts.bu },
    disableBc: true
  })
  provider.on('connection-close', (event) => {
    if (event) process.stderr.write(`interop: ${label} closed by server: ${event.code} ${event.reason}\n`)
  })
  const errors = new Set()
  provider.on('connection-error', (event) => {
    const text = event?.message ?? event?.error?.message ?? String(event)
    if (!errors.has(text)) process.stderr.write(`interop: ${label} connection error: ${text}\n`)
    errors.add(text)
  })
  provider.on('closed', ({ code, reason }) => fail(`${label}: server refused for good: ${code} ${reason}`))
  providers.push(provider)
  return { label, doc, provider, fields: doc.getMap('fields') }
}

/** Resolve when predicate() holds, re-checked on every doc update; reject after TIMEOUT_MS. */
const until = (what, docs, predicate, describe) => new Promise((resolve, reject) => {
  const check = () => {
    if (!predicate()) return false
    clearTimeout(timer)
    for (const d of docs) d.off('update', check)
    resolve()
    return true
  }
  const timer = setTimeout(() => {
    for (const d of docs) d.off('update', check)
    reject(new Error(`timed out after ${TIMEOUT_MS} ms waiting for ${what}; ${describe()}`))
  }, TIMEOUT_MS)
  if (!check()) for (const d of docs) d.on('update', check)
})

const synced = (peer) => new Promise((resolve, reject) => {
  if (peer.provider.synced) return resolve()
  const timer = setTimeout(
    () => reject(new Error(`timed out after ${TIMEOUT_MS} ms waiting for ${peer.label} to sync (${peer.provider.url.replace(/token=[^&]*/, 'token=…')})`)),
    TIMEOUT_MS
  )
  peer.provider.once('synced', () => { clearTimeout(timer); resolve() })
})

const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const show = (...peers) => () => peers.map((p) => `${p.label}=${JSON.stringify(p.fields.toJSON())}`).join(' ')

async function twoPeers () {
  const a = open('a', opts['token-a'])
  const b = open('b', opts['token-b'])
  await Promise.all([synced(a), synced(b)])

  // 1. each writes its own field; both must end up with both (only the server connects them)
  a.fields.set('jobdesc', 'from node A')
  b.fields.set('remarks', 'from node B')
  await until('both fields on both docs', [a.doc, b.doc], () =>
    [a, b].every((p) => p.fields.get('jobdesc') === 'from node A' && p.fields.get('remarks') === 'from node B'),
  show(a, b))

  // 2. a valid value, then a type error that the server repairs with its own edit
  const seen = { a: [], b: [] }
  for (const p of [a, b]) {
    p.fields.observe((event) => {
      if (event.keysChanged.has('gracetime')) seen[p.label].push(p.fields.get('gracetime'))
    })
  }
  a.fields.set('gracetime', 15)
  await until('gracetime 15 on b', [b.doc], () => b.fields.get('gracetime') === 15, show(a, b))
  a.fields.set('gracetime', 'fifteen')
  const clockOfBadWrite = Y.getState(a.doc.store, a.doc.clientID)
  // 15 again *after* the bad write integrated: only a later (server-authored) edit can do that
  const repaired = (p) => Y.getState(p.doc.store, a.doc.clientID) >= clockOfBadWrite &&
    p.fields.get('gracetime') === 15
  await until('the server repair of gracetime on both docs', [a.doc, b.doc],
    () => repaired(a) && repaired(b), show(a, b))
  const authors = (p) => [...p.doc.store.clients.keys()].filter((c) => c !== a.doc.clientID && c !== b.doc.clientID)
  if (authors(a).length === 0 || authors(b).length === 0) fail('the repair was not authored by a third (server) client')

  // 3. awareness from a reaches b through the server
  a.provider.awareness.setLocalStateField('user', { name: 'node A', color: '#ff0000' })
  const aware = () => b.provider.awareness.getStates().get(a.doc.clientID)?.user?.name === 'node A'
  await new Promise((resolve, reject) => {
    if (aware()) return resolve()
    const timer = setTimeout(() => reject(new Error(`timed out after ${TIMEOUT_MS} ms waiting for a's awareness on b; b sees ${JSON.stringify([...b.provider.awareness.getStates()])}`)), TIMEOUT_MS)
    b.provider.awareness.on('change', function check () {
      if (aware()) {
        clearTimeout(timer)
        b.provider.awareness.off('change', check)
        resolve()
      }
    })
  })

  // 4. quiet: the server echoed every update to its sender; a provider that took the echo
  //    for anything but a no-op would keep sending. Nothing more may leave either provider.
  const before = { a: stats.a.sent, b: stats.b.sent }
  await delay(500)
  const resent = { a: stats.a.sent - before.a, b: stats.b.sent - before.b }
  if (resent.a || resent.b) fail(`providers kept sending while idle: ${JSON.stringify(resent)}`)
  for (const p of [a, b]) {
    if (!p.provider.synced || !p.provider.wsconnected) fail(`${p.label} is no longer synced/connected`)
  }

  process.stdout.write(JSON.stringify({
    a: a.fields.toJSON(),
    b: b.fields.toJSON(),
    gracetime_seen: seen,
    stats
  }) + '\n')
}

async function watch () {
  const eq = opts.watch.indexOf('=')
  if (eq < 1) fail('--watch wants FIELD=VALUE')
  const field = opts.watch.slice(0, eq)
  const raw = opts.watch.slice(eq + 1)
  let wanted
  try { wanted = JSON.parse(raw) } catch { wanted = raw }
  const w = open('watch', opts['token-a'])
  await synced(w)
  // Alone on the record, the provider hears nothing but the server's echo of its own
  // awareness (sent on connect, renewed every 15 s). y-websocket closes and reopens a socket
  // that received nothing for 30 s, so without that echo a lone provider churns forever.
  const deadline = Date.now() + TIMEOUT_MS
  while (stats.watch.awareness_received === 0) {
    if (Date.now() > deadline) fail('the server never echoed our own awareness: a lone y-websocket provider would reconnect every 30 s')
    await delay(10)
  }
  process.stdout.write(JSON.stringify({ event: 'synced', fields: w.fields.toJSON() }) + '\n')
  await until(`${field} == ${JSON.stringify(wanted)}`, [w.doc], () => w.fields.get(field) === wanted, show(w))
  process.stdout.write(JSON.stringify({ event: 'seen', fields: w.fields.toJSON(), stats }) + '\n')
}

try {
  await (opts.watch ? watch() : twoPeers())
} catch (err) {
  fail(err.message)
}
// Clean teardown: provider.destroy() closes its socket and clears its timers but leaves the
// Awareness (and its 3 s check interval) to the doc, so destroy the doc too. The process
// must then end by itself once the close handshakes are done; anything still alive after
// 5 s is a leak and fails the run.
for (const p of providers) {
  p.destroy()
  p.doc.destroy()
}
setTimeout(() => fail(`still running 5 s after teardown: ${process.getActiveResourcesInfo()}`), 5000).unref()
