// The operator's page: GET /v1/admin/status with the admin token typed here (kept for this tab only),
// /v1/cluster, and /metrics parsed from Prometheus' text format — refreshed every 2 s.
const $ = (id) => document.getElementById(id);
const KEY = 'switchboard.admin_token';
const EVERY_MS = 2000;
let timer = null;
/** The previous read of the counters: series → value, and when. */
let previous = { at: 0, values: new Map() };

$('token-form').addEventListener('submit', (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY, $('token').value);
  $('token').value = '';
  refresh();
});
$('forget').addEventListener('click', () => {
  sessionStorage.removeItem(KEY);
  clearTimeout(timer);
  $('panels').hidden = true;
  $('forget').hidden = true;
  status('closed', 'Not signed in');
});

function status(state, text) {
  $('updated').dataset.state = state;
  $('updated').textContent = text;
}

async function refresh() {
  clearTimeout(timer);
  const token = sessionStorage.getItem(KEY);
  if (!token) return;
  try {
    const r = await fetch('/v1/admin/status', { headers: { authorization: `Bearer ${token}` } });
    const body = await r.json().catch(() => null);
    if (r.status === 401) {
      sessionStorage.removeItem(KEY);
      $('panels').hidden = true;
      $('error').textContent = `Refused: ${body?.error?.message || 'wrong token'}`;
      status('unauthorized', 'Token refused');
      return;
    }
    if (!r.ok) throw new Error(`status: HTTP ${r.status}`);
    const [cluster, metrics] = await Promise.all([
      fetch('/v1/cluster').then((x) => x.json()),
      fetch('/metrics').then((x) => x.text()),
    ]);
    $('error').textContent = '';
    $('panels').hidden = false;
    $('forget').hidden = false;
    renderNode(body);
    renderCluster(cluster);
    renderMetrics(parseMetrics(metrics));
    status('open', `Updated ${new Date().toLocaleTimeString()}`);
  } catch (err) {
    status('waiting', `Node unreachable (${err.message}); retrying`);
  }
  timer = setTimeout(refresh, EVERY_MS);
}

function cell(text, cls) {
  const td = document.createElement('td');
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function renderNode(s) {
  const rows = [
    ['Name', s.node], ['State', s.state], ['Version', s.version], ['HTTP', s.http],
    ['In a cluster', s.clustered ? 'yes' : 'no'], ['Connections', s.connections],
    ['Online users', s.online_users], ['Hosted conversations', s.hosted_conversations],
  ];
  $('node').replaceChildren(
    ...rows.flatMap(([k, v]) => {
      const dt = document.createElement('dt');
      dt.textContent = k;
      const dd = document.createElement('dd');
      dd.textContent = String(v);
      dd.dataset.field = k.toLowerCase().replace(/ /g, '_');
      return [dt, dd];
    }),
  );
  $('users').textContent = s.users.length ? s.users.join(', ') : 'none';
  $('convs').replaceChildren(
    ...s.conversations.map((c) => {
      const li = document.createElement('li');
      const code = document.createElement('code');
      code.textContent = c;
      li.append(code);
      return li;
    }),
  );
}

function renderCluster(c) {
  $('cluster').replaceChildren(
    ...c.nodes.map((n) => {
      const tr = document.createElement('tr');
      tr.dataset.node = n.name;
      tr.append(
        cell(n.name + (n.name === c.node ? ' (this node)' : '')), cell(n.state), cell(n.http), cell(n.cluster || '—'),
        cell(String(n.connections), 'num'), cell(String(n.online_users), 'num'), cell(String(n.conversations), 'num'),
      );
      return tr;
    }),
  );
}

/** Prometheus text format → [{name, labels, value, type}] for Switchboard's own series. */
export function parseMetrics(text) {
  const types = new Map();
  const out = [];
  for (const line of text.split('\n')) {
    const typeLine = line.match(/^# TYPE (\S+) (\S+)/);
    if (typeLine) {
      types.set(typeLine[1], typeLine[2]);
      continue;
    }
    if (!line.startsWith('switchboard_')) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/);
    if (!m) continue;
    const base = m[1].replace(/_(sum|count|bucket)$/, '');
    out.push({ name: m[1], labels: (m[2] || '').slice(1, -1), value: Number(m[3]), type: types.get(m[1]) || types.get(base) || '' });
  }
  return out;
}

function renderMetrics(series) {
  const now = Date.now();
  const dt = (now - previous.at) / 1000;
  const values = new Map();
  $('metrics').replaceChildren(
    ...series.map((s) => {
      const key = `${s.name}{${s.labels}}`;
      values.set(key, s.value);
      const before = previous.values.get(key);
      const counting = s.type === 'counter' || /_(count|sum)$/.test(s.name);
      const rate = counting && before !== undefined && dt > 0 ? ((s.value - before) / dt).toFixed(1) : '';
      const tr = document.createElement('tr');
      tr.dataset.metric = s.name;
      const shown = Number.isInteger(s.value) ? String(s.value) : s.value.toPrecision(4);
      tr.append(cell(s.name), cell(s.labels), cell(shown, 'num'), cell(rate, 'num'));
      return tr;
    }),
  );
  previous = { at: now, values };
}

refresh();
