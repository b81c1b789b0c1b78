// Runs the suite's tests for a reverse proxy against BASE and prints one JSON document:
//   {"tests": [{id, kind, name, suite}], "results": {id: true | [error, message]},
//    "made5xx": [{id, status, closed}]}
// TESTS (comma-separated ids) runs some of them; every test is run as the suite's CLI runs it
// (100 at a time). "made5xx" lists each 5xx answer that the test server did not send: it has
// none of the headers the server puts on each of its answers, so the proxy made it; "closed"
// says the server closed the connection instead of answering that request (an origin failure
// the proxy may rightly answer with a 5xx).
import fetch from 'node-fetch'
import { runTests, getResults } from 'http-cache-tests/client/runner.mjs'
import suites from 'http-cache-tests/tests/index.mjs'
import surrogate from 'http-cache-tests/tests/surrogate-control.mjs'

const base = process.env.BASE
if (!base) throw new Error('BASE (the proxy\'s URL) is not set')
const wanted = new Set((process.env.TESTS || '').split(',').filter(id => id))

const chosen = []
for (const suite of [...suites, surrogate]) {
  const tests = suite.tests.filter(test => !test.browser_only && (!wanted.size || wanted.has(test.id)))
  if (tests.length) chosen.push({ ...suite, tests })
}
const found = chosen.flatMap(suite => suite.tests.map(test => test.id))
const unknown = [...wanted].filter(id => !found.includes(id))
if (unknown.length) throw new Error(`no such test: ${unknown.join(', ')}`)

const byId = new Map(chosen.flatMap(suite => suite.tests.map(test => [test.id, test])))
const made = []
function watched (url, init) {
  return fetch(url, init).then(response => {
    if (response.status >= 500 && !response.headers.has('server-request-count')) {
      const sent = new Map((init.headers || []).map(([name, value]) => [name.toLowerCase(), value]))
      const test = byId.get(sent.get('test-id'))
      const request = test ? test.requests[Number(sent.get('req-num')) - 1] : undefined
      made.push({ id: test ? test.id : url, status: response.status, closed: Boolean(request && request.disconnect) })
    }
    return response
  })
}

await runTests(chosen, watched, false, base)
console.log(JSON.stringify({
  tests: chosen.flatMap(suite => suite.tests.map(test => ({
    id: test.id, kind: test.kind || 'required', name: test.name, suite: suite.name
  }))),
  results: getResults(),
  made5xx: made
}))
