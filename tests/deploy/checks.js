#!/usr/bin/env node
// Offline checks of the deployment files, called by tests/deploy/run.sh (one check a call):
//
//   node checks.js k8s-schema FILE...          every object validates against the API schema
//   node checks.js k8s-policy FILE             the fields operators rely on (see k8sPolicy)
//   node checks.js env-drift FILE CONTRACT|- SRCROOT|-
//                                              ConfigMap keys + secret refs cover the contract
//                                              and every variable the C sources read, and
//                                              hold nothing that neither names
//   node checks.js compose-schema FILE SCHEMA  the compose file against the Compose Spec schema
//   node checks.js compose-policy FILE EXAMPLE_ENV CONTRACT|- SRCROOT|-
//   node checks.js dockerfile-policy FILE...   non-root, exec form, health check, --version
//   node checks.js gateway-policy FILE         the routes and headers of the nginx gateway
//   node checks.js same-objects FILE FILE      two kustomize builds hold the same objects
//   node checks.js sql-policy DIR|FILE         deploy/sql holds the schema, no data
//
// Prints the problems, one a line, and exits 1 when there is any; 0 and nothing otherwise.
// A FILE of Kubernetes objects is the multi-document YAML `kustomize build` prints.
'use strict';

const fs = require('fs');
const path = require('path');
const YAML = require('yaml');

const problems = [];
const fail = (msg) => problems.push(msg);
// Worth reading, not a failure (printed to stderr).
const note = (msg) => process.stderr.write(`note: ${msg}\n`);

function readYamlDocs(file) {
  const docs = YAML.parseAllDocuments(fs.readFileSync(file, 'utf8'), { merge: true });
  const out = [];
  for (const d of docs) {
    if (d.errors.length) throw new Error(`${file}: ${d.errors[0].message}`);
    const v = d.toJS({ maxAliasCount: 100 });
    if (v !== null && v !== undefined) out.push(v);
  }
  return out;
}

const objName = (o) => `${o.kind || '?'}/${(o.metadata && o.metadata.name) || '?'}`;

// ---------------------------------------------------------------------------------------------
// Kubernetes: schema

// The API versions we use, each served by every supported Kubernetes release (1.26 and later
// removed autoscaling/v2beta2, policy/v1beta1 and the extensions group). The models package
// still ships some removed versions, so this list is what rejects them.
const SERVED = {
  v1: ['ConfigMap', 'Namespace', 'Service', 'Secret', 'ServiceAccount'],
  'apps/v1': ['Deployment', 'StatefulSet', 'DaemonSet'],
  'autoscaling/v2': ['HorizontalPodAutoscaler'],
  'policy/v1': ['PodDisruptionBudget'],
  'networking.k8s.io/v1': ['Ingress', 'NetworkPolicy'],
};

function k8sSchema(files) {
  for (const file of files) {
    const objs = readYamlDocs(file);
    if (objs.length === 0) fail(`${file}: no objects`);
    for (const o of objs) {
      if (!o.apiVersion || !o.kind) {
        fail(`${file}: an object without apiVersion/kind`);
        continue;
      }
      if (!(SERVED[o.apiVersion] || []).includes(o.kind)) {
        fail(`${objName(o)}: ${o.apiVersion} ${o.kind} is not a served API version (use one of ` +
          `${Object.entries(SERVED).map(([v, ks]) => ks.map((k) => `${v} ${k}`).join(', ')).join(', ')})`);
        continue;
      }
      const mod = o.apiVersion === 'v1' ? 'kubernetes-models/v1' : `kubernetes-models/${o.apiVersion}`;
      const Model = require(mod)[o.kind];
      try {
        new Model(o).validate();
      } catch (e) {
        fail(`${objName(o)}: ${e.message.replace(/\s+/g, ' ')}`);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes: the fields that matter (the schema accepts unknown fields and misses intent)

const SECRET_VARS = ['REDIS_URL', 'DATABASE_URL', 'JWT_SECRET'];
const SECRETISH = /(SECRET|PASSWORD|TOKEN|PRIVATE_KEY|API_KEY|^REDIS_URL$|^DATABASE_URL$)/;

function k8sPolicy(file) {
  const objs = readYamlDocs(file);
  const byKind = (k) => objs.filter((o) => o.kind === k);
  const deployments = byKind('Deployment');
  if (deployments.length === 0) fail('no Deployment');
  for (const o of objs) {
    if (o.kind === 'Secret') fail(`${objName(o)}: Secret objects (values) do not belong in the manifests`);
    if (o.kind === 'ConfigMap') {
      for (const k of Object.keys(o.data || {})) {
        if (SECRETISH.test(k)) fail(`${objName(o)}: ${k} is a secret: reference it with secretKeyRef`);
      }
    }
  }
  for (const d of deployments) {
    const n = objName(d);
    const spec = d.spec || {};
    const pod = (spec.template || {}).spec || {};
    const meta = (spec.template || {}).metadata || {};
    if (!(spec.replicas >= 2)) fail(`${n}: replicas must be 2 or more (got ${spec.replicas})`);
    const ann = meta.annotations || {};
    if (ann['prometheus.io/scrape'] !== 'true' || !ann['prometheus.io/port'] || ann['prometheus.io/path'] !== '/metrics') {
      fail(`${n}: pod template needs prometheus.io/scrape "true", prometheus.io/port and prometheus.io/path /metrics`);
    }
    const psc = pod.securityContext || {};
    if (pod.hostNetwork || pod.hostPID || pod.hostIPC) fail(`${n}: host namespaces are not allowed`);
    const containers = pod.containers || [];
    if (containers.length === 0) fail(`${n}: no containers`);
    let maxPreStop = 0;
    for (const c of containers) {
      const cn = `${n} container ${c.name}`;
      const sc = c.securityContext || {};
      if (!(sc.runAsNonRoot === true || (psc.runAsNonRoot === true && sc.runAsNonRoot !== false))) {
        fail(`${cn}: runAsNonRoot must be true`);
      }
      const uid = sc.runAsUser !== undefined ? sc.runAsUser : psc.runAsUser;
      if (uid === 0) fail(`${cn}: runAsUser 0 (root)`);
      if (sc.allowPrivilegeEscalation !== false) fail(`${cn}: allowPrivilegeEscalation must be false`);
      if (sc.readOnlyRootFilesystem !== true) fail(`${cn}: readOnlyRootFilesystem must be true`);
      if (sc.privileged) fail(`${cn}: privileged`);
      const drop = ((sc.capabilities || {}).drop || []);
      if (!drop.includes('ALL')) fail(`${cn}: capabilities.drop must include ALL`);
      if (((sc.capabilities || {}).add || []).length) fail(`${cn}: capabilities.add is not allowed`);
      const res = c.resources || {};
      for (const kind of ['requests', 'limits']) {
        for (const r of ['cpu', 'memory']) {
          if (!(res[kind] && res[kind][r] !== undefined)) fail(`${cn}: resources.${kind}.${r} is missing`);
        }
      }
      if (res.requests && res.limits && res.requests.memory && res.limits.memory &&
          quantity(res.requests.memory) > quantity(res.limits.memory)) {
        fail(`${cn}: memory request above its limit`);
      }
      const probe = (p, pathWanted, what) => {
        if (!p || !p.httpGet) return fail(`${cn}: ${what} must be an httpGet probe`);
        if (p.httpGet.path !== pathWanted) fail(`${cn}: ${what} must GET ${pathWanted} (got ${p.httpGet.path})`);
      };
      probe(c.livenessProbe, '/healthz', 'livenessProbe');
      probe(c.readinessProbe, '/readyz', 'readinessProbe');
      const pre = ((c.lifecycle || {}).preStop || {});
      const cmd = (pre.exec || {}).command || [];
      const m = cmd.length === 2 && cmd[0] === 'sleep' ? Number(cmd[1]) : (pre.sleep ? pre.sleep.seconds : NaN);
      if (!(m > 0)) fail(`${cn}: preStop must sleep a few seconds (endpoint removal before SIGTERM)`);
      else maxPreStop = Math.max(maxPreStop, m);
      for (const e of c.env || []) {
        if (SECRET_VARS.includes(e.name) || SECRETISH.test(e.name)) {
          if (e.value !== undefined) fail(`${cn}: ${e.name} has a literal value: use secretKeyRef`);
          else if (!(e.valueFrom && e.valueFrom.secretKeyRef)) fail(`${cn}: ${e.name} must come from a secretKeyRef`);
        }
      }
      if (!(c.envFrom || []).some((f) => f.configMapRef)) fail(`${cn}: settings must come from a ConfigMap (envFrom)`);
    }
    // Drain: the daemons exit within 10 s of SIGTERM (docs/openapi.yaml), after the preStop sleep.
    const grace = pod.terminationGracePeriodSeconds;
    if (!(grace >= maxPreStop + 10)) {
      fail(`${n}: terminationGracePeriodSeconds ${grace} leaves less than 10 s after the ${maxPreStop} s preStop`);
    } else if (grace > 60) {
      fail(`${n}: terminationGracePeriodSeconds ${grace} is far above the 10 s drain`);
    }
    const labels = (spec.selector || {}).matchLabels || {};
    const selects = (sel) => sel && Object.keys(sel).length > 0 &&
      Object.entries(sel).every(([k, v]) => (meta.labels || {})[k] === v);
    const svc = byKind('Service').find((s) => selects((s.spec || {}).selector));
    if (!svc) fail(`${n}: no Service selects its pods`);
    const pdb = byKind('PodDisruptionBudget').find((p) => selects(((p.spec || {}).selector || {}).matchLabels));
    if (!pdb) fail(`${n}: no PodDisruptionBudget selects its pods`);
    const hpa = byKind('HorizontalPodAutoscaler').find((h) =>
      ((h.spec || {}).scaleTargetRef || {}).kind === 'Deployment' && h.spec.scaleTargetRef.name === d.metadata.name);
    if (!hpa) fail(`${n}: no HorizontalPodAutoscaler targets it`);
    else if (!(hpa.spec.minReplicas >= 2)) fail(`${objName(hpa)}: minReplicas must be 2 or more`);
    if (!Object.keys(labels).length) fail(`${n}: empty selector`);
  }
  // Routes: /api/markets/ to price-service, /ws/ to order-notifier, WebSocket-friendly timeouts.
  const routes = [];
  for (const ing of byKind('Ingress')) {
    for (const rule of (ing.spec || {}).rules || []) {
      for (const p of ((rule.http || {}).paths || [])) {
        routes.push({ ing, path: p.path, type: p.pathType, svc: (((p.backend || {}).service) || {}).name });
      }
    }
  }
  const route = (p) => routes.find((r) => r.path === p);
  const api = route('/api/markets/');
  if (!api || api.svc !== 'price-service' || api.type !== 'Prefix') {
    fail('Ingress: /api/markets/ must route (Prefix) to the price-service Service');
  }
  const ws = route('/ws/');
  if (!ws || ws.svc !== 'order-notifier' || ws.type !== 'Prefix') {
    fail('Ingress: /ws/ must route (Prefix) to the order-notifier Service');
  } else {
    const a = ws.ing.metadata.annotations || {};
    for (const k of ['proxy-read-timeout', 'proxy-send-timeout']) {
      const v = Number(a[`nginx.ingress.kubernetes.io/${k}`]);
      if (!(v >= 300)) fail(`${objName(ws.ing)}: nginx.ingress.kubernetes.io/${k} must be 300 s or more for WebSockets (got ${v})`);
    }
  }
  for (const r of routes) {
    if (!byKind('Service').some((s) => s.metadata.name === r.svc)) fail(`Ingress ${r.path}: no Service ${r.svc}`);
  }
}

function quantity(q) {
  const m = /^([0-9.]+)([A-Za-z]*)$/.exec(String(q));
  if (!m) return NaN;
  const mult = { '': 1, k: 1e3, M: 1e6, G: 1e9, Ki: 1024, Mi: 1024 ** 2, Gi: 1024 ** 3, m: 1e-3 }[m[2]];
  return Number(m[1]) * (mult === undefined ? NaN : mult);
}

// ---------------------------------------------------------------------------------------------
// Environment variables: contract <-> manifests <-> sources

// The daemons' names in the contract's "who" column and in the manifests.
const DAEMONS = { price: 'price-service', notifier: 'order-notifier' };
// Read by the daemons but deliberately unset: an optional file of reloadable settings.
const OPTIONAL_VARS = ['CONFIG_FILE'];

// Parses the configuration table (docs/CONFIGURATION.md): { 'price-service': Set, 'order-notifier': Set }.
function contractVars(file) {
  const out = { 'price-service': new Set(), 'order-notifier': new Set() };
  const re = /^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|\s*([a-z]+)\s*\|/;
  for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
    const m = re.exec(line);
    if (!m) continue;
    const who = m[2] === 'both' ? Object.values(DAEMONS) : [DAEMONS[m[2]]];
    if (!who[0]) throw new Error(`${file}: unknown daemon "${m[2]}" for ${m[1]}`);
    for (const d of who) out[d].add(m[1]);
  }
  if (!out['price-service'].size || !out['order-notifier'].size) throw new Error(`${file}: no configuration table found`);
  return out;
}

// Variables the C sources read, per daemon folder (common/src counts for both): every string
// literal shaped like a variable name ("CACHE_TTL_MS": capitals, digits, at least one '_'),
// whichever helper passes it on to cm_config_*() or getenv(). Comments are skipped.
function sourceVars(root) {
  const re = /"([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)"/g;
  const scan = (dir) => {
    const names = new Set();
    if (!fs.existsSync(dir)) return names;
    for (const f of fs.readdirSync(dir)) {
      if (!/\.[ch]$/.test(f)) continue;
      const text = fs.readFileSync(path.join(dir, f), 'utf8')
        .replace(/\/\*[\s\S]*?\*\//g, ' ').replace(/\/\/.*$/gm, ' ');
      for (const m of text.matchAll(re)) names.add(m[1]);
    }
    return names;
  };
  const common = scan(path.join(root, 'common', 'src'));
  const out = {};
  for (const d of Object.values(DAEMONS)) out[d] = new Set([...scan(path.join(root, d)), ...common]);
  return out;
}

// { deployment name: Set of variables its containers get (ConfigMap keys + env names) }.
function manifestVars(objs) {
  const cms = Object.fromEntries(objs.filter((o) => o.kind === 'ConfigMap').map((o) => [o.metadata.name, o]));
  const out = {};
  for (const d of objs.filter((o) => o.kind === 'Deployment')) {
    const vars = new Set();
    for (const c of d.spec.template.spec.containers || []) {
      for (const f of c.envFrom || []) {
        if (!f.configMapRef) continue;
        const cm = cms[f.configMapRef.name];
        if (!cm) { fail(`${objName(d)}: envFrom names ConfigMap ${f.configMapRef.name}, which is not in the build`); continue; }
        for (const k of Object.keys(cm.data || {})) vars.add(k);
      }
      for (const e of c.env || []) vars.add(e.name);
    }
    out[d.metadata.name] = vars;
  }
  return out;
}

const diff = (a, b) => [...a].filter((x) => !b.has(x)).sort();

function envDrift(file, contractFile, srcRoot) {
  const have = manifestVars(readYamlDocs(file));
  const contract = contractFile !== '-' ? contractVars(contractFile) : null;
  const src = srcRoot !== '-' ? sourceVars(srcRoot) : null;
  for (const d of Object.values(DAEMONS)) {
    const got = have[d];
    if (!got) { fail(`no Deployment ${d}`); continue; }
    const read = src && src[d].size ? src[d] : null;
    if (contract) {
      const missing = diff(contract[d], got).filter((v) => !OPTIONAL_VARS.includes(v));
      if (missing.length) fail(`${d}: contract variables not set by the manifests: ${missing.join(', ')}`);
    }
    if (read) {
      const unset = diff(read, got).filter((v) => !OPTIONAL_VARS.includes(v));
      if (unset.length) fail(`${d}: read by the sources but absent from its ConfigMap and Secret references: ${unset.join(', ')}`);
      if (contract) {
        const ext = diff(read, contract[d]).filter((v) => !OPTIONAL_VARS.includes(v));
        if (ext.length) note(`${d}: reads variables the contract does not list yet: ${ext.join(', ')}`);
      }
    } else if (src) {
      note(`${d}: its sources read no variable yet; compared with the contract only`);
    }
    // A variable nobody reads is a typo or a leftover (the daemon would silently ignore it).
    const known = new Set([...(contract ? contract[d] : []), ...(read || [])]);
    if (known.size) {
      const stale = diff(got, known);
      if (stale.length) fail(`${d}: set by the manifests but read by nobody (contract${read ? ' or sources' : ''}): ${stale.join(', ')}`);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Compose

function composeSchema(file, schemaFile) {
  const Ajv2019 = require('ajv/dist/2019');
  const schema = JSON.parse(fs.readFileSync(schemaFile, 'utf8'));
  // The draft is Ajv2019's own; its "$schema" URI (with a trailing #) is not registered there.
  delete schema.$schema;
  // Draft-04 style "id" keywords (strings), which Ajv 8 refuses; a property named id is an object.
  const dropIds = (node) => {
    if (!node || typeof node !== 'object') return;
    if (typeof node.id === 'string') delete node.id;
    for (const v of Object.values(node)) dropIds(v);
  };
  dropIds(schema);
  const ajv = new Ajv2019({ strict: false, allErrors: true, validateFormats: false });
  const validate = ajv.compile(schema);
  const [doc] = readYamlDocs(file);
  if (!validate(doc)) {
    for (const e of validate.errors) fail(`${file}${e.instancePath || '/'}: ${e.message}${e.params && e.params.additionalProperty ? ` (${e.params.additionalProperty})` : ''}`);
  }
}

// Services we build (the daemons and the scripts image) may only be given contract variables;
// the third-party images keep their own (POSTGRES_*).
function composePolicy(file, exampleEnv, contractFile, srcRoot) {
  const [doc] = readYamlDocs(file);
  const text = fs.readFileSync(file, 'utf8');
  const services = doc.services || {};
  // What each daemon reads: the contract's table, else (no configuration table at hand) its sources.
  let contract = contractFile && contractFile !== '-' ? contractVars(contractFile) : null;
  if (!contract && srcRoot && srcRoot !== '-') {
    const src = sourceVars(srcRoot);
    if (src['price-service'].size && src['order-notifier'].size) contract = src;
  }
  const allContract = contract ? new Set([...contract['price-service'], ...contract['order-notifier']]) : null;
  for (const [name, s] of Object.entries(services)) {
    for (const p of s.ports || []) {
      const spec = typeof p === 'object' ? p.host_ip : String(p);
      if (typeof p === 'object' ? p.host_ip !== '127.0.0.1' : !/^127\.0\.0\.1:/.test(spec)) {
        fail(`${name}: port ${JSON.stringify(p)} must be published on 127.0.0.1 only`);
      }
    }
    const oneShot = s.restart === 'no';
    const image = s.image || '';
    if (/:latest$/.test(image) || (image && !image.includes(':'))) fail(`${name}: image ${image} needs a pinned tag`);
    const ownImage = !!s.build || /^markets\//.test(image);
    if (!s.healthcheck && !oneShot && !(ownImage && /scripts/.test(image))) fail(`${name}: no healthcheck`);
    for (const [dep, cond] of Object.entries(s.depends_on || {})) {
      const target = services[dep];
      if (!target) { fail(`${name}: depends_on unknown service ${dep}`); continue; }
      const c = typeof cond === 'object' ? cond.condition : undefined;
      if (target.healthcheck && c !== 'service_healthy') fail(`${name}: depends_on ${dep} needs condition: service_healthy`);
    }
    if (Array.isArray(s.depends_on)) fail(`${name}: depends_on must be a map with conditions`);
    const env = s.environment || {};
    const keys = Array.isArray(env) ? env.map((e) => String(e).split('=')[0]) : Object.keys(env);
    if (s.env_file) fail(`${name}: env_file is not used here: secrets come from .env by interpolation`);
    if (ownImage && allContract) {
      for (const k of keys) if (!allContract.has(k)) fail(`${name}: ${k} is not a variable of the contract`);
    }
    const daemon = Object.values(DAEMONS).includes(name) ? name : null;
    if (daemon && contract) {
      for (const k of keys) if (!contract[daemon].has(k)) fail(`${name}: ${k} is not read by ${daemon} (contract)`);
    }
    for (const k of keys) {
      const v = Array.isArray(env) ? String(env.find((e) => String(e).startsWith(`${k}=`))).slice(k.length + 1) : String(env[k]);
      if (/SECRET|PASSWORD|TOKEN/.test(k) && !/^\$\{[A-Z_]+:\?/.test(v)) {
        fail(`${name}: ${k} must come from .env as a required variable (\${${k}:?...}), not a literal`);
      }
      const cred = /:\/\/[^:@/]*:([^@]*)@/.exec(v);
      if (/^(DATABASE_URL|REDIS_URL)$/.test(k) && cred && !/^\$\{[A-Z_]+:\?[^}]*\}$/.test(cred[1])) {
        fail(`${name}: ${k} holds a literal password`);
      }
    }
  }
  // Every ${VAR} the file uses is documented in the example env file (or has a default).
  const example = new Set(fs.readFileSync(exampleEnv, 'utf8').split('\n')
    .map((l) => /^([A-Z_][A-Z0-9_]*)=/.exec(l)).filter(Boolean).map((m) => m[1]));
  for (const m of text.matchAll(/\$\{([A-Z_][A-Z0-9_]*)(:?[-?][^}]*)?\}/g)) {
    if (!example.has(m[1]) && !(m[2] && m[2].includes('-'))) fail(`${m[1]}: used by ${path.basename(file)} but not in ${path.basename(exampleEnv)}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Dockerfiles (beyond the linter): parsed into stages of [instruction, args].

function dockerStages(file) {
  const lines = fs.readFileSync(file, 'utf8').replace(/\\\n/g, ' ').split('\n');
  const stages = [];
  for (const raw of lines) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const m = /^(\w+)\s+(.*)$/.exec(line);
    if (!m) continue;
    const ins = m[1].toUpperCase();
    if (ins === 'FROM') stages.push({ from: m[2], ins: [] });
    else if (stages.length) stages[stages.length - 1].ins.push([ins, m[2]]);
  }
  return stages;
}

function dockerfilePolicy(files) {
  for (const file of files) {
    const f = path.basename(file);
    const stages = dockerStages(file);
    if (!stages.length) { fail(`${f}: no FROM`); continue; }
    for (const s of stages) {
      if (!/^debian:(12|bookworm)(-slim)?(@sha256:[0-9a-f]{64})?(\s+AS\s+\w+)?$/i.test(s.from)) {
        fail(`${f}: FROM ${s.from}: the images build and run on Debian 12 (debian:12, debian:12-slim)`);
      }
    }
    const last = stages[stages.length - 1];
    const get = (ins) => last.ins.filter(([i]) => i === ins).map(([, a]) => a);
    const user = get('USER').pop();
    if (!user || /^(root|0)(:|$)/.test(user) || !/^[1-9][0-9]*(:[0-9]+)?$/.test(user)) {
      fail(`${f}: the runtime stage must end with a numeric non-root USER (got ${user})`);
    }
    const ep = get('ENTRYPOINT').pop();
    if (!ep || !ep.trim().startsWith('[')) fail(`${f}: ENTRYPOINT must be in exec form (JSON array) so SIGTERM reaches the daemon`);
    const daemon = /(?:^|\.)(price-service|order-notifier)\.Dockerfile$/.exec(f);
    if (daemon) {
      const hc = get('HEALTHCHECK').pop() || '';
      if (!/\/healthz/.test(hc)) fail(`${f}: HEALTHCHECK must probe /healthz`);
      for (const [i, s] of stages.entries()) {
        if (!s.ins.some(([ins, a]) => ins === 'RUN' && a.includes(daemon[1]) && a.includes('--version'))) {
          fail(`${f}: stage ${i + 1} does not run the binary's --version`);
        }
      }
      if (stages.length < 2) fail(`${f}: must be a multi-stage build`);
    }
    // What COPY takes from the build context exists and is let through by /.dockerignore
    // (an allow-list: "*" then "!dir/" lines).
    const root = process.env.DEPLOY_ROOT;
    if (root) {
      const ignore = fs.readFileSync(path.join(root, '.dockerignore'), 'utf8').split('\n').map((l) => l.trim());
      const allowed = new Set(ignore.filter((l) => l.startsWith('!')).map((l) => l.slice(1).replace(/\/$/, '')));
      for (const s of stages) {
        for (const [ins, a] of s.ins) {
          if ((ins !== 'COPY' && ins !== 'ADD') || /--from=/.test(a)) continue;
          const words = a.split(/\s+/).filter((w) => w && !w.startsWith('--'));
          for (const src of words.slice(0, -1)) {
            const top = src.replace(/^\.\//, '').split('/')[0];
            if (!fs.existsSync(path.join(root, src))) fail(`${f}: COPY ${src}: not in the repository`);
            else if (!allowed.has(top)) fail(`${f}: COPY ${src}: excluded from the build context by .dockerignore`);
          }
        }
      }
    }
  }
}

// Packages a Dockerfile installs, per stage: `node checks.js docker-packages FILE` prints
// "<stage index> <last|build> <package>" lines for run.sh to check against apt.
function dockerPackages(file) {
  const stages = dockerStages(file);
  const out = [];
  stages.forEach((s, i) => {
    for (const [ins, args] of s.ins) {
      if (ins !== 'RUN') continue;
      for (const m of args.matchAll(/apt-get\s+install\s+([^&;|]*)/g)) {
        for (const w of m[1].split(/\s+/)) {
          if (w && !w.startsWith('-')) out.push(`${i} ${i === stages.length - 1 ? 'runtime' : 'build'} ${w}`);
        }
      }
    }
  });
  process.stdout.write(out.join('\n') + (out.length ? '\n' : ''));
}

// ---------------------------------------------------------------------------------------------
// Gateway

function gatewayPolicy(file) {
  const text = fs.readFileSync(file, 'utf8').replace(/#.*$/gm, '');
  const block = (loc) => {
    const i = text.indexOf(`location ${loc} {`);
    if (i < 0) return null;
    let depth = 0;
    for (let j = text.indexOf('{', i); j < text.length; j++) {
      if (text[j] === '{') depth++;
      else if (text[j] === '}' && --depth === 0) return text.slice(i, j + 1);
    }
    return null;
  };
  const upstream = (name) => (new RegExp(`upstream\\s+${name}\\s*\\{([^}]*)\\}`).exec(text) || [])[1] || '';
  if (!/server\s+price-service:8080\s*;/.test(upstream('price_service'))) fail('upstream price_service must be price-service:8080');
  if (!/server\s+order-notifier:8081\s*;/.test(upstream('order_notifier'))) fail('upstream order_notifier must be order-notifier:8081');
  const want = { '/api/markets/': 'price_service', '/ws/': 'order_notifier', '/': 'order_notifier' };
  for (const [loc, up] of Object.entries(want)) {
    const b = block(loc);
    if (!b) { fail(`no location ${loc}`); continue; }
    if (!new RegExp(`proxy_pass\\s+http://${up}\\s*;`).test(b)) fail(`location ${loc} must proxy_pass to ${up}`);
  }
  const ws = block('/ws/') || '';
  // proxy_set_header in a location replaces the server's list, so /ws/ must carry all of them.
  for (const h of [/proxy_set_header\s+Upgrade\s+\$http_upgrade/, /proxy_set_header\s+Connection\s+\$\w+/,
    /proxy_set_header\s+X-Request-Id\s+\$\w+/i, /proxy_set_header\s+X-Forwarded-For\s+\$proxy_add_x_forwarded_for/i,
    /proxy_http_version\s+1\.1|^\s*proxy_http_version\s+1\.1/m]) {
    if (!h.test(ws) && !(h.source.startsWith('proxy_http_version') && /proxy_http_version\s+1\.1/.test(text))) {
      fail(`location /ws/ lacks ${h.source.replace(/\\s\+/g, ' ').replace(/\\/g, '')}`);
    }
  }
  const rt = /proxy_read_timeout\s+(\d+)s?\s*;/.exec(ws);
  if (!rt || Number(rt[1]) < 300) fail('location /ws/ needs proxy_read_timeout of 300 s or more');
  if (!/proxy_set_header\s+X-Request-Id\s+\$\w+/i.test(text.replace(ws, ''))) fail('X-Request-Id is not passed to price-service');
  if (!/proxy_set_header\s+X-Forwarded-For\s+\$proxy_add_x_forwarded_for/i.test(text.replace(ws, ''))) fail('X-Forwarded-For is not passed to price-service');
}

// ---------------------------------------------------------------------------------------------
// SQL: deploy/sql is what a production database gets (deploy/README.md), so it holds the
// schema only. Demo rows belong to scripts/dev_seed.sql, which only the dev stack and the
// tests apply: a data statement here gave every new production database made-up prices.

const DATA_STMT = /^\s*(INSERT|UPDATE|DELETE|COPY|MERGE|TRUNCATE)\b/i;

function sqlPolicy(target) {
  const files = fs.statSync(target).isDirectory()
    ? fs.readdirSync(target).filter((f) => f.endsWith('.sql')).sort().map((f) => path.join(target, f))
    : [target];
  if (files.length === 0) fail(`${target}: no .sql files`);
  for (const file of files) {
    const f = path.basename(file);
    // Dollar-quoted bodies are set aside (a trigger function's INSERT is schema, a DO
    // block's is data), then strings and comments go, so ';' splits statements.
    const bodies = [];
    const text = fs.readFileSync(file, 'utf8').replace(
      /\$([A-Za-z_]*)\$([\s\S]*?)\$\1\$|'(?:[^']|'')*'|--[^\n]*|\/\*[\s\S]*?\*\//g,
      (m, tag, body) => (body !== undefined ? `$${bodies.push(body) - 1}$` : ' '));
    for (const stmt of text.split(';')) {
      const m = DATA_STMT.exec(stmt) || /^\s*WITH\b[\s\S]*?\b(INSERT|UPDATE|DELETE)\b/i.exec(stmt);
      const doBody = /^\s*DO\b[^$]*\$(\d+)\$/i.exec(stmt);
      const inDo = doBody && /\b(INSERT|UPDATE|DELETE|COPY)\b/i.exec(bodies[Number(doBody[1])]);
      if (m || inDo) {
        fail(`${f}: ${(m || inDo)[1].toUpperCase()} statement: deploy/sql holds the schema only; ` +
          'demo or seed data goes to scripts/dev_seed.sql (dev stack and tests)');
      }
    }
  }
}

// Two builds of one kustomization hold the same objects (order and formatting aside).
function sameObjects(a, b) {
  const load = (f) => readYamlDocs(f).map((o) => JSON.stringify(o)).sort();
  if (JSON.stringify(load(a)) !== JSON.stringify(load(b))) fail(`${a} and ${b} hold different objects`);
}

// ---------------------------------------------------------------------------------------------

const [cmd, ...args] = process.argv.slice(2);
try {
  switch (cmd) {
    case 'k8s-schema': k8sSchema(args); break;
    case 'k8s-policy': k8sPolicy(args[0]); break;
    case 'env-drift': envDrift(args[0], args[1], args[2]); break;
    case 'compose-schema': composeSchema(args[0], args[1]); break;
    case 'compose-policy': composePolicy(args[0], args[1], args[2], args[3]); break;
    case 'dockerfile-policy': dockerfilePolicy(args); break;
    case 'docker-packages': dockerPackages(args[0]); break;
    case 'gateway-policy': gatewayPolicy(args[0]); break;
    case 'same-objects': sameObjects(args[0], args[1]); break;
    case 'sql-policy': sqlPolicy(args[0]); break;
    default: fail(`unknown check ${cmd}`);
  }
} catch (e) {
  fail(e.message);
}
for (const p of problems) console.log(p);
process.exit(problems.length ? 1 : 0);
