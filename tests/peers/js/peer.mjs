// A js-libp2p 2.x node over QUIC (@chainsafe/libp2p-quic 1.1.8: quinn + rustls): an independent
// libp2p peer for the interop tests. Installed by `make peers` into .peers/js-libp2p, where this
// file is symlinked; run it from there with `node --preserve-symlinks-main` so its imports resolve
// to that node_modules. Driven by tests/rig/libp2p_peers.py.
//
//   listen --key-type ed25519|secp256k1|rsa [--key-file F]
//     Listens on /ip4/127.0.0.1/udp/0/quic-v1 with ping, identify and identify push; prints one
//     JSON line {peer_id, addrs, pid, key_type} when ready, then one JSON line per event:
//     connected {remote_peer_id, remote_addr, direction}, identify {remote_peer_id, observed_addr,
//     listen_addrs, protocols, ...} (what the remote's identify reported, on identify and push)
//     or identify_failed {remote_peer_id, error},
//     ping {remote_peer_id, count} (pings js-libp2p's own responder answered on one stream),
//     disconnected {remote_peer_id, remote_addr}. Exits 0 on SIGTERM, SIGINT or EOF on stdin.
//   dial MULTIADDR [--count N] [--key-type T] [--key-file F]
//     Dials, pings N times on one /ipfs/ping/1.0.0 stream, identifies; prints {rtts: [ms...],
//     remote_peer_id, local_peer_id, identify: {...} or {error}} and exits 0, or {error} and exits
//     1. It does not compare the remote's peer id with the dialled /p2p/ one (see below).
//
// Logs go to stderr (DEBUG=libp2p:* for js-libp2p's own). A key file holds a libp2p protobuf
// private key; missing, it is created (0600).
//
// What js-libp2p does that the tests rely on (read from its source, and tried with libp2p 2.10.0
// and libp2p-quic 1.1.8): its transport parameters carry disable_active_migration (and
// max_idle_timeout 10 s), so a client must not migrate; its identify reports the connection's
// remote multiaddr (/ip4/../udp/P/quic-v1/p2p/..) as the observed address; the default connection
// monitor pings every open connection every 10 s and aborts one whose ping fails; a dial succeeds
// to a node whose certificate carries another peer id than the dialled /p2p/ one (the transport
// takes the id from the certificate and never compares); identify fails with
// UnsupportedKeyTypeError when an RSA peer sends a signed peer record (the envelope's key goes
// through peerIdFromCID), so identify of an RSA py-libp2p node fails.

// Node 20 lacks Promise.withResolvers (node 22 has it); js-libp2p's dependencies call it.
Promise.withResolvers ??= () => { let resolve, reject; const promise = new Promise((a, b) => { resolve = a; reject = b }); return { promise, resolve, reject } }

import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import { parseArgs } from 'node:util'
import { performance } from 'node:perf_hooks'

// Imported after the polyfill above (static imports would be evaluated before it).
const { createLibp2p } = await import('libp2p')
const { quic } = await import('@chainsafe/libp2p-quic')
const { ping } = await import('@libp2p/ping')
const { identify, identifyPush } = await import('@libp2p/identify')
const { generateKeyPair, privateKeyFromProtobuf, privateKeyToProtobuf } = await import('@libp2p/crypto/keys')
const { randomBytes } = await import('@libp2p/crypto')
const { multiaddr } = await import('@multiformats/multiaddr')
const { byteStream } = await import('it-byte-stream')

const LISTEN = '/ip4/127.0.0.1/udp/0/quic-v1'
const PING = '/ipfs/ping/1.0.0'
const PING_SIZE = 32
const KEY_TYPES = { ed25519: 'Ed25519', secp256k1: 'secp256k1', rsa: 'RSA' }

function emit (obj) {
  process.stdout.write(JSON.stringify(obj) + '\n')
}

function log (...args) {
  console.error(new Date().toISOString(), 'js_libp2p_peer', ...args)
}

async function loadKey (keyType, keyFile) {
  if (keyFile != null && existsSync(keyFile)) {
    return privateKeyFromProtobuf(readFileSync(keyFile))
  }
  const key = keyType === 'rsa' ? await generateKeyPair('RSA', 2048) : await generateKeyPair(KEY_TYPES[keyType])
  if (keyFile != null) {
    writeFileSync(keyFile, privateKeyToProtobuf(key), { mode: 0o600 })
  }
  return key
}

function identifyDict (result) {
  return {
    protocol_version: result.protocolVersion ?? null,
    agent_version: result.agentVersion ?? null,
    observed_addr: result.observedAddr?.toString() ?? null,
    listen_addrs: result.listenAddrs.map(String),
    protocols: result.protocols,
    public_key_len: result.publicKey?.length ?? 0,
    signed_peer_record: result.signedPeerRecord != null
  }
}

async function makeNode (args, listen) {
  const privateKey = await loadKey(args['key-type'], args['key-file'])
  const node = await createLibp2p({
    privateKey,
    addresses: { listen: listen ? [LISTEN] : [] },
    transports: [quic()],
    // Identify runs on each new connection as by default, but from here, so a failure is seen.
    services: { ping: ping(), identify: identify({ runOnConnectionOpen: false }), identifyPush: identifyPush() }
  })
  return { node, keyType: privateKey.type.toLowerCase() }
}

// A stream whose writes are reported: the ping service's own responder answers on it.
function tapWrites (stream, onBytes) {
  const sink = stream.sink.bind(stream)
  return new Proxy(stream, {
    get (target, prop) {
      if (prop === 'sink') {
        return (source) => sink((async function * () {
          for await (const chunk of source) {
            yield chunk
            onBytes(chunk.byteLength)
          }
        })())
      }
      const value = Reflect.get(target, prop, target)
      return typeof value === 'function' ? value.bind(target) : value
    }
  })
}

async function reportPings (node) {
  const service = node.services.ping
  await node.unhandle(PING)
  await node.handle(PING, (data) => {
    const remote = data.connection.remotePeer.toString()
    let written = 0
    let count = 0
    const stream = tapWrites(data.stream, (n) => {
      written += n
      while (written >= (count + 1) * PING_SIZE) {
        count += 1
        emit({ event: 'ping', remote_peer_id: remote, count })
      }
    })
    service.handleMessage({ ...data, stream })
  }, { runOnLimitedConnection: true })
}

async function runListen (args) {
  const { node, keyType } = await makeNode(args, true)
  node.addEventListener('connection:open', (evt) => {
    const c = evt.detail
    emit({ event: 'connected', remote_peer_id: c.remotePeer.toString(), remote_addr: c.remoteAddr.toString(), direction: c.direction })
    node.services.identify.identify(c).catch((err) => {
      emit({ event: 'identify_failed', remote_peer_id: c.remotePeer.toString(), error: `${err.name}: ${err.message}` })
    })
  })
  node.addEventListener('connection:close', (evt) => {
    const c = evt.detail
    emit({ event: 'disconnected', remote_peer_id: c.remotePeer.toString(), remote_addr: c.remoteAddr.toString() })
  })
  node.addEventListener('peer:identify', (evt) => {
    emit({ event: 'identify', remote_peer_id: evt.detail.peerId.toString(), ...identifyDict(evt.detail) })
  })
  await reportPings(node)

  // Stop handlers go in before the ready line: a SIGTERM right after it still exits cleanly.
  let stopping = false
  const stop = async (why) => {
    if (stopping) return
    stopping = true
    log(`${why}: stopping`)
    await node.stop()
    process.exit(0)
  }
  process.on('SIGTERM', () => { stop('SIGTERM') })
  process.on('SIGINT', () => { stop('SIGINT') })
  process.stdin.on('end', () => { stop('stdin closed') })
  process.stdin.on('error', () => { stop('stdin error') })
  process.stdin.resume()
  emit({ peer_id: node.peerId.toString(), addrs: node.getMultiaddrs().map(String), pid: process.pid, key_type: keyType })
}

async function pingRtts (connection, count, signal) {
  const stream = await connection.newStream(PING, { signal, runOnLimitedConnection: true })
  const bytes = byteStream(stream)
  const rtts = []
  for (let i = 0; i < count; i++) {
    const payload = randomBytes(PING_SIZE)
    const start = performance.now()
    await bytes.write(payload, { signal })
    const echoed = (await bytes.read({ bytes: PING_SIZE, signal })).subarray()
    rtts.push(performance.now() - start)
    if (Buffer.compare(Buffer.from(echoed), Buffer.from(payload)) !== 0) {
      throw new Error('ping payload mismatch')
    }
  }
  await bytes.unwrap().close({ signal })
  return rtts
}

async function runDial (args, target) {
  let ma
  try {
    ma = multiaddr(target)
  } catch (err) {
    emit({ error: `bad multiaddr ${JSON.stringify(target)}: ${err.message}` })
    return 2
  }
  const { node } = await makeNode(args, false)
  const signal = AbortSignal.timeout(Number(args.timeout) * 1000)
  try {
    const connection = await node.dial(ma, { signal })
    const rtts = await pingRtts(connection, Number(args.count), signal)
    let identified
    try {
      identified = identifyDict(await node.services.identify.identify(connection, { signal }))
    } catch (err) {
      log('identify failed', err)
      identified = { error: `${err.name}: ${err.message}` }
    }
    emit({
      rtts,
      remote_peer_id: connection.remotePeer.toString(),
      local_peer_id: node.peerId.toString(),
      identify: identified
    })
    return 0
  } catch (err) {
    log('dial failed', err)
    emit({ error: `${err.name}: ${err.message}` })
    return 1
  } finally {
    await node.stop()
  }
}

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    'key-type': { type: 'string', default: 'ed25519' },
    'key-file': { type: 'string' },
    count: { type: 'string', default: '3' },
    timeout: { type: 'string', default: '20' }
  }
})
const [mode, target] = positionals
if (!(values['key-type'] in KEY_TYPES)) {
  console.error(`--key-type must be one of ${Object.keys(KEY_TYPES).join(', ')}, not ${values['key-type']}`)
  process.exit(2)
}
if (mode === 'listen') {
  await runListen(values)
} else if (mode === 'dial' && target != null) {
  process.exit(await runDial(values, target))
} else {
  console.error('usage: peer.mjs listen [--key-type T] [--key-file F] | dial MULTIADDR [--count N] [--key-type T] [--key-file F]')
  process.exit(2)
}
