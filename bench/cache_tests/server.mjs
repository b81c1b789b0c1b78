// The suite's test server (the origin every test talks to), bound to 127.0.0.1 only: the
// suite's own server.mjs listens on every address, and nothing in cachecar's runs may.
// Its port and pid file come from the environment, as the suite's `npm run server` passes them
// (npm_config_port, npm_config_protocol, npm_config_pidfile).
import net from 'net'

const listen = net.Server.prototype.listen
net.Server.prototype.listen = function (port, ...rest) {
  return listen.call(this, port, '127.0.0.1', ...rest)
}

await import('http-cache-tests/server/server.mjs')
