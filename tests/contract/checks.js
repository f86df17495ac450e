#!/usr/bin/env node
// Offline checks of the API contract, called by tests/contract/run.sh (one check a call):
//
//   node checks.js asyncapi FILE           the AsyncAPI parser (its schema and its spectral
//                                          rules): no error and no warning
//   node checks.js async-examples FILE     every message example validates against the
//                                          message's payload and headers schemas (the parser
//                                          does not check examples of AsyncAPI 3)
//   node checks.js drift OPENAPI ASYNCAPI SRCROOT
//                                          the specs say what the C sources send: routes and
//                                          their daemon, error codes with their statuses,
//                                          Cache-Status values, close codes, frame types, the
//                                          order fields, configuration variables
//   node checks.js links DOCSDIR ROOT      the documents link each other as they should
//
// Prints the problems, one a line, and exits 1 when there is any; 0 and nothing otherwise.
'use strict';

const fs = require('fs');
const path = require('path');
const YAML = require('yaml');

const problems = [];
const fail = (msg) => problems.push(msg);

function readYaml(file) {
  const doc = YAML.parseDocument(fs.readFileSync(file, 'utf8'));
  if (doc.errors.length) throw new Error(`${file}: ${doc.errors[0].message}`);
  return doc.toJS();
}

const read = (root, rel) => fs.readFileSync(path.join(root, rel), 'utf8');

// A local JSON pointer ("#/components/schemas/X") inside `doc`.
function pointer(doc, ref) {
  if (!ref.startsWith('#/')) throw new Error(`not a local reference: ${ref}`);
  return ref
    .slice(2)
    .split('/')
    .map((p) => p.replace(/~1/g, '/').replace(/~0/g, '~'))
    .reduce((o, k) => (o === undefined ? undefined : o[k]), doc);
}

const deref = (doc, node) => {
  let n = node;
  for (let i = 0; n && typeof n === 'object' && n.$ref && i < 20; i++) n = pointer(doc, n.$ref);
  return n;
};

const eqSets = (what, documented, actual) => {
  const d = new Set(documented);
  const a = new Set(actual);
  for (const x of a) if (!d.has(x)) fail(`${what}: ${x} is sent by the daemons but not documented`);
  for (const x of d) if (!a.has(x)) fail(`${what}: ${x} is documented but the sources never send it`);
};

// ---------------------------------------------------------------------------------------------
// AsyncAPI: the parser, and the examples

async function asyncapi(file) {
  const { Parser } = require('@asyncapi/parser');
  const { document, diagnostics } = await new Parser().parse(fs.readFileSync(file, 'utf8'), {
    source: path.resolve(file),
  });
  // Severity: 0 error, 1 warning, 2 information, 3 hint (spectral's). The information that a
  // newer AsyncAPI version exists is not a defect of this document.
  for (const d of diagnostics) {
    if (d.severity <= 1) {
      const line = d.range && d.range.start ? `:${d.range.start.line + 1}` : '';
      fail(`${file}${line}: ${d.code}: ${d.message} (at ${d.path.join('.') || '/'})`);
    }
  }
  if (!document && !problems.length) fail(`${file}: the parser gave no document`);
}

function schemaValidator(doc, draft) {
  const Ajv = draft === '2020-12' ? require('ajv/dist/2020') : require('ajv');
  const ajv = new Ajv({ strict: false, allErrors: true });
  // The whole document is the schema resource, so the "#/components/..." references inside
  // the payload schemas resolve as they do in the document.
  ajv.addSchema({ ...doc, $id: 'doc' }, 'doc');
  return (ref, value) => {
    const validate = ajv.getSchema(`doc${ref}`);
    if (!validate) return [`no schema at ${ref}`];
    return validate(value) ? [] : validate.errors.map((e) => `${e.instancePath || '/'} ${e.message}`);
  };
}

function asyncExamples(file) {
  const doc = readYaml(file);
  const check = schemaValidator(doc, 'draft-07');
  const messages = (doc.components && doc.components.messages) || {};
  for (const [name, m] of Object.entries(messages)) {
    const examples = m.examples || [];
    if (!examples.length) fail(`${file}: message ${name} has no example`);
    examples.forEach((ex, i) => {
      const label = `${file}: message ${name}, example ${ex.name || i}`;
      if (!('payload' in ex)) fail(`${label}: no payload`);
      else for (const e of check(`#/components/messages/${name}/payload`, ex.payload)) fail(`${label}: payload ${e}`);
      if (m.headers) {
        if (!('headers' in ex)) fail(`${label}: no headers (the message has a headers schema)`);
        else for (const e of check(`#/components/messages/${name}/headers`, ex.headers)) fail(`${label}: headers ${e}`);
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Drift between the specs and the sources

const METHODS = ['get', 'head', 'post', 'put', 'delete', 'patch', 'options', 'trace'];
// Documented before the daemon serves it (being built): may be missing from the sources.
const PLANNED_PATHS = new Set(['/sse/orders']);

// The error codes a schema allows for `error.code` (an enum, a const, or a union of those).
function errorCodes(doc, schema, out = new Set()) {
  const s = deref(doc, schema);
  if (!s || typeof s !== 'object') return out;
  for (const k of ['allOf', 'oneOf', 'anyOf']) for (const sub of s[k] || []) errorCodes(doc, sub, out);
  const err = s.properties && deref(doc, s.properties.error);
  const code = err && err.properties && err.properties.code;
  if (code) {
    if ('const' in code) out.add(code.const);
    else if (code.enum) code.enum.forEach((c) => out.add(c));
    else fail(`an error schema allows any code: ${JSON.stringify(code)}`);
  }
  return out;
}

// Every (status, code) the OpenAPI document says, from every response of every operation and
// from the answers to any request (x-any-request).
function documentedErrors(doc) {
  const pairs = new Set();
  const add = (status, resp) => {
    const r = deref(doc, resp);
    const media = r && r.content && r.content['application/json'];
    if (!media) return;
    for (const c of errorCodes(doc, media.schema)) pairs.add(`${status} ${c}`);
  };
  for (const item of Object.values(doc.paths || {}))
    for (const m of METHODS)
      for (const [status, resp] of Object.entries((item[m] && item[m].responses) || {})) add(status, resp);
  for (const resp of Object.values(doc['x-any-request'] || {})) {
    const r = deref(doc, resp);
    const status = { NotFound: '404', MethodNotAllowed: '405', Overloaded: '503', HttpVersionNotSupported: '505' }[resp.$ref.split('/').pop()];
    if (!status) fail(`x-any-request: ${resp.$ref}: unknown status`);
    else add(status, r);
  }
  return pairs;
}

// The (status, code) pairs the C sources answer with, from each way they build an error.
function sentErrors(src) {
  const pairs = new Set();
  const patterns = [
    /cm_http_respond_error\(\s*\w+,\s*(\d{3}),\s*"([a-z_]+)"/g, // (req, status, code, ...)
    /\b(?:on_stream_)?reject\(\s*\w+,\s*\w+,\s*(\d{3}),\s*"([a-z_]+)"/g, //         (req, app, status, code, ...)
    /\bset_err\(\s*\w+,\s*(\d{3}),\s*"([a-z_]+)"/g, //               (conn, status, code, ...)
    /\b(?:http_)?conn_fail\(\s*\w+,\s*(\d{3}),\s*"([a-z_]+)"/g, //             (conn, status, code, ...)
    /err_status = (\d{3});\s*\w+->err_code = "([a-z_]+)"/g, //       set by hand
    /"HTTP\/1\.1 (\d{3})[\s\S]{0,300}?\\"code\\":\\"([a-z_]+)\\"/g, // a canned answer
    /\brefuse\(\s*\w+,\s*(\d{3}),\s*"([a-z_]+)"/g, //                (why, status, code, ...): cm/ws
    /\.oom_code = "([a-z_]+)"()/g, //                             cm/service: its 500 answers
  ];
  for (const text of src)
    for (const re of patterns)
      for (const m of text.matchAll(re)) pairs.add(m[2] ? `${m[1]} ${m[2]}` : `500 ${m[1]}`);
  return pairs;
}

function cFiles(root, dirs) {
  const out = [];
  for (const d of dirs)
    for (const f of fs.readdirSync(path.join(root, d)).sort())
      if (/\.[ch]$/.test(f)) out.push(path.join(d, f));
  return out;
}

function drift(openapiFile, asyncapiFile, root) {
  const oas = readYaml(openapiFile);
  const aas = readYaml(asyncapiFile);
  const priceSrc = cFiles(root, ['price-service']).map((f) => read(root, f));
  const notifierSrc = cFiles(root, ['order-notifier']).map((f) => read(root, f));
  const commonSrc = cFiles(root, ['common/src', 'common/include/cm']).map((f) => read(root, f));

  // Routes: each daemon's router paths are documented, on that daemon's server (a path without
  // its own servers is on both daemons and must be routed by both). A daemon on cm/service also
  // routes the service's own paths (common/src/service_routes.c).
  const routeCall = /(?:cm_router_add|cm_service_route)\([^"]*"(\/[^"]*)"/g;
  const shared = [...read(root, 'common/src/service_routes.c').matchAll(routeCall)].map((m) => m[1]);
  const routes = (texts) => {
    const out = new Set();
    for (const t of texts) for (const m of t.matchAll(routeCall)) out.add(m[1]);
    if (texts.some((t) => /\bcm_service_start\(/.test(t))) for (const p of shared) out.add(p);
    return out;
  };
  const byDaemon = { 'price-service': routes(priceSrc), 'order-notifier': routes(notifierSrc) };
  const paths = oas.paths || {};
  for (const [daemon, set] of Object.entries(byDaemon)) {
    if (!set.size) fail(`no cm_router_add or cm_service_route paths found in the ${daemon} sources`);
    for (const p of set) {
      if (!paths[p]) { fail(`openapi: ${daemon} routes ${p}, which is not documented`); continue; }
      const servers = paths[p].servers;
      if (servers && !servers.some((s) => (s.description || '').startsWith(daemon)))
        fail(`openapi: ${p} is routed by ${daemon} but documented on ${servers.map((s) => s.description).join(', ')}`);
    }
  }
  for (const [p, item] of Object.entries(paths)) {
    const daemons = item.servers
      ? Object.keys(byDaemon).filter((d) => item.servers.some((s) => (s.description || '').startsWith(d)))
      : Object.keys(byDaemon);
    if (!daemons.length) fail(`openapi: ${p}: its servers name neither daemon`);
    for (const d of daemons)
      if (!byDaemon[d].has(p) && !PLANNED_PATHS.has(p)) fail(`openapi: ${p} is documented on ${d}, which does not route it`);
  }

  // Error codes, with their statuses.
  const documented = documentedErrors(oas);
  const sent = sentErrors([...priceSrc, ...notifierSrc, ...commonSrc]);
  if (sent.size < 10) fail(`only ${sent.size} error answers found in the sources: the patterns no longer match`);
  for (const p of sent) if (!documented.has(p)) fail(`openapi: the daemons answer ${p}, which no response documents`);
  const codeEnum = (oas.components.schemas.ErrorCode || {}).enum || [];
  eqSets('openapi ErrorCode', codeEnum, [...sent].map((p) => p.split(' ')[1]));
  for (const p of documented)
    if (!codeEnum.includes(p.split(' ')[1])) fail(`openapi: ${p} is not in ErrorCode`);

  // Cache-Status: the values in cache_impl.h are the documented enum.
  const cache = read(root, 'price-service/cache_impl.h');
  const statuses = [...cache.matchAll(/^#define PS_CACHE_STATUS_\w+ "([^"]+)"/gm)].map((m) => m[1]);
  if (!statuses.length) fail('price-service/cache_impl.h: no PS_CACHE_STATUS_ strings found');
  eqSets('openapi CacheStatus', (oas.components.schemas.CacheStatus || {}).enum || [], statuses);
  for (const name of ['CacheStatusAnswered', 'CacheStatusUnavailable'])
    for (const v of (oas.components.schemas[name] || {}).enum || [])
      if (!statuses.includes(v)) fail(`openapi ${name}: ${v} is not a value of cache_impl.h`);

  // Close codes: those of cm/ws.h that the sources use (not only declare) are the channel's
  // x-close-codes; a code the header marks "never sent" only names what a peer did.
  const wsh = read(root, 'common/include/cm/ws.h');
  const users = [...notifierSrc, ...commonSrc.filter((t) => t !== wsh)].join('\n');
  const closeCodes = [...wsh.matchAll(/(CM_WS_CLOSE_\w+) = (\d{4}),([^\n]*)/g)]
    .filter((m) => !/never sent/.test(m[3]) && (m[1] === 'CM_WS_CLOSE_NORMAL' || new RegExp(`\\b${m[1]}\\b`).test(users)))
    .map((m) => Number(m[2]));
  const ws = Object.values(aas.channels || {}).find((c) => c.address === '/ws/orders');
  if (!ws) fail('asyncapi: no channel with address /ws/orders');
  else {
    const documentedClose = (ws['x-close-codes'] || []).map((c) => c.code);
    eqSets('asyncapi x-close-codes', documentedClose, closeCodes);
    for (const c of closeCodes)
      if (!new RegExp(`\\| ${c} \\|`).test(ws.description || '')) fail(`asyncapi: close code ${c} is not in the channel's table`);
  }

  // Frame types: every "type" the notifier writes or reads is a message, and back.
  const types = new Set();
  for (const t of notifierSrc) {
    for (const m of t.matchAll(/"type",\s*"([a-z_]+)"/g)) types.add(m[1]);
    for (const m of t.matchAll(/\\"type\\":\\"([a-z_]+)\\"/g)) types.add(m[1]);
    for (const m of t.matchAll(/strcmp\(type->valuestring,\s*"([a-z_]+)"\)/g)) types.add(m[1]);
  }
  const msgTypes = [];
  for (const m of Object.values(aas.components.messages || {})) {
    const p = deref(aas, m.payload);
    const t = p && p.properties && p.properties.type && p.properties.type.const;
    if (!t) fail(`asyncapi: message ${m.name} has no const type`);
    else if (!msgTypes.includes(t)) msgTypes.push(t);
  }
  eqSets('asyncapi message types', msgTypes, [...types]);

  // The order fields: event.c's allow-list is the Order schema.
  const event = read(root, 'order-notifier/event.c');
  const list = event.match(/on_event_order_fields\[\] = \{([^}]*)\}/);
  if (!list) fail('order-notifier/event.c: on_event_order_fields not found');
  else {
    const fields = [...list[1].matchAll(/"([a-z_]+)"/g)].map((m) => m[1]);
    const order = aas.components.schemas.Order || {};
    eqSets('asyncapi Order properties', Object.keys(order.properties || {}), fields);
    if (order.additionalProperties !== false) fail('asyncapi Order: additionalProperties must be false (the allow-list)');
  }

  // Configuration: every variable the specs name is in the configuration table.
  const table = read(root, 'docs/CONFIGURATION.md');
  const known = new Set([...table.matchAll(/^\| `([A-Z][A-Z0-9_]+)`/gm)].map((m) => m[1]));
  if (known.size < 10) fail('docs/CONFIGURATION.md: the table was not found');
  for (const file of [openapiFile, asyncapiFile]) {
    const text = fs.readFileSync(file, 'utf8');
    for (const m of text.matchAll(/`([A-Z][A-Z0-9]*_[A-Z0-9_]+)`/g))
      if (!known.has(m[1])) fail(`${path.basename(file)}: ${m[1]} is not in docs/CONFIGURATION.md`);
  }
}

// ---------------------------------------------------------------------------------------------
// Links between the documents

function links(docsDir, root) {
  const has = (file, target) => {
    const text = fs.readFileSync(file, 'utf8');
    if (!text.includes(`](${target})`)) fail(`${path.relative(root, file)} does not link ${target}`);
  };
  has(path.join(docsDir, 'openapi.yaml'), 'CONFIGURATION.md');
  has(path.join(docsDir, 'openapi.yaml'), 'asyncapi.yaml');
  has(path.join(docsDir, 'asyncapi.yaml'), 'CONFIGURATION.md');
  has(path.join(docsDir, 'asyncapi.yaml'), 'openapi.yaml');
  for (const f of ['openapi.yaml', 'asyncapi.yaml', 'CONFIGURATION.md']) {
    has(path.join(docsDir, 'README.md'), f);
    has(path.join(root, 'README.md'), `docs/${f}`);
  }
  // Nothing outside the repository is named.
  for (const f of ['openapi.yaml', 'asyncapi.yaml', 'README.md']) {
    const text = fs.readFileSync(path.join(docsDir, f), 'utf8');
    if (/\]\((\.\.\/){2,}|\]\(\/|shared\//.test(text)) fail(`docs/${f} names a path outside the repository`);
  }
}

// ---------------------------------------------------------------------------------------------

const [cmd, ...args] = process.argv.slice(2);
const commands = {
  asyncapi: () => asyncapi(args[0]),
  'async-examples': () => asyncExamples(args[0]),
  drift: () => drift(args[0], args[1], args[2]),
  links: () => links(args[0], args[1]),
};
(async () => {
  if (!commands[cmd]) {
    console.error(`usage: checks.js ${Object.keys(commands).join('|')} ARGS...`);
    process.exit(2);
  }
  try {
    await commands[cmd]();
  } catch (e) {
    fail(e.stack || String(e));
  }
  if (problems.length) {
    for (const p of problems) console.log(p);
    process.exit(1);
  }
})();
