// Berth's dashboard: a page over the public REST API, with the caller's own key. Nothing here
// is trusted: every call carries the key, and the API decides what the key may see (the admin
// token: the fleet and every project's queue; a project key: its own runners and runs).
'use strict';

const KEY = 'berth.key';
const PAGE = 50;
let cleanup = [];

// ---------------------------------------------------------------- helpers

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'class') e.className = v;
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function key() { return sessionStorage.getItem(KEY); }
function isAdmin() { return sessionStorage.getItem(KEY + '.admin') === '1'; }

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${key()}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  const data = text ? JSON.parse(text) : null;
  if (res.status === 401) { logout(); throw new ApiError(401, data); }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

function toast(message) {
  const t = document.getElementById('toast');
  t.textContent = message;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 4000);
}

function status(s) { return el('span', { class: `status ${s}`, 'data-status': s }, s); }
function when(iso) { return iso ? new Date(iso).toLocaleString() : '—'; }
function mib(n) { return n >= 1024 ? `${(n / 1024).toFixed(1)} GiB` : `${n} MiB`; }
function usd(n) { return n === null || n === undefined ? '—' : `$${n.toFixed(6)}`; }
function secs(n) { return n === null || n === undefined ? '—' : `${n} s`; }
/// A fill bar (styled through the CSSOM: the page's CSP allows no inline style attribute).
function bar(fraction) {
  const fill = el('span');
  fill.style.width = `${Math.round(100 * Math.min(1, Math.max(0, fraction)))}%`;
  return el('span', { class: 'bar' }, fill);
}
function runLink(r) { return el('a', { href: `#/runs/${r.runner_id}/${r.id}`, class: 'mono' }, r.id); }
function waited(r) {
  if (!r.created_at) return '—';
  return `${Math.max(0, Math.round((Date.now() - new Date(r.created_at)) / 1000))} s`;
}

/// Re-renders `fn` every `ms` while the page is shown.
function every(ms, fn) {
  const timer = setInterval(() => fn().catch(showError), ms);
  cleanup.push(() => clearInterval(timer));
}

function showError(e) {
  if (e && e.status === 401) return;
  toast(e && e.message ? e.message : String(e));
}

function page(title, ...children) {
  const main = document.getElementById('main');
  main.replaceChildren(el('h1', {}, title), ...children);
  return main;
}

function table(id, headers, rows, empty) {
  return el('table', { id },
    el('thead', {}, el('tr', {}, headers.map(h => el('th', { class: h.num ? 'num' : null }, h.label || h)))),
    el('tbody', {}, rows.length ? rows : el('tr', { class: 'empty' }, el('td', { colspan: headers.length, class: 'muted' }, empty))));
}

// ---------------------------------------------------------------- login

function logout() {
  sessionStorage.removeItem(KEY);
  sessionStorage.removeItem(KEY + '.admin');
  location.hash = '#/login';
}

async function login(value) {
  sessionStorage.setItem(KEY, value);
  try {
    await api('GET', '/v1/runners');
  } catch (e) {
    sessionStorage.removeItem(KEY);
    throw e.status === 401 ? new Error('That key is not valid') : e;
  }
  let admin = false;
  try { await api('GET', '/v1/nodes'); admin = true; } catch (e) { if (e.status !== 403) throw e; }
  sessionStorage.setItem(KEY + '.admin', admin ? '1' : '0');
}

function loginPage() {
  const input = el('input', { id: 'key', type: 'password', placeholder: 'API key or admin token', autocomplete: 'off' });
  const error = el('p', { id: 'login-error', class: 'error' });
  const form = el('form', {
    class: 'card',
    onsubmit: async ev => {
      ev.preventDefault();
      error.textContent = '';
      try {
        await login(input.value.trim());
        location.hash = isAdmin() ? '#/fleet' : '#/runners';
      } catch (e) { error.textContent = e.message; }
    },
  },
  el('p', {}, 'Log in with an API key (a project\'s runners and runs) or the admin token (the fleet). The key stays in this tab.'),
  el('div', { class: 'toolbar' }, input, el('button', { id: 'login', class: 'primary', type: 'submit' }, 'Log in')),
  error);
  page('Log in', form);
  input.focus();
}

// ---------------------------------------------------------------- fleet

async function fleetPage() {
  const holder = el('div');
  page('Fleet', el('p', { class: 'muted' }, 'Nodes, their load and liveness; refreshed every 2 s.'), holder);
  async function render() {
    const { nodes } = await api('GET', '/v1/nodes');
    const rows = nodes.map(n => {
      const used = n.total_memory_mib - n.free_memory_mib;
      const age = n.last_heartbeat_age_seconds;
      const fresh = age < 10 ? 'fresh' : age < 30 ? 'late' : 'gone';
      const action = n.draining
        ? el('button', { class: 'resume', onclick: () => nodeAction(n.id, 'resume') }, 'Resume')
        : el('button', { class: 'drain danger', onclick: () => nodeAction(n.id, 'drain') }, 'Drain');
      return el('tr', { 'data-node-id': n.id, 'data-draining': n.draining ? 'true' : 'false' },
        el('td', { class: 'mono' }, n.id),
        el('td', {}, n.region),
        el('td', {}, status(n.draining ? 'draining' : n.status)),
        el('td', {}, bar(n.total_memory_mib ? used / n.total_memory_mib : 0),
          `${mib(n.free_memory_mib)} free of ${mib(n.total_memory_mib)}`),
        el('td', { class: 'num' }, `${n.running_runs.length} / ${n.max_concurrent_runs}`),
        el('td', { class: `num ${fresh}`, 'data-heartbeat': fresh }, `${age.toFixed(1)} s ago`),
        el('td', { class: 'num', title: n.cached_images.join('\n') }, n.cached_images.length),
        el('td', {}, action));
    });
    holder.replaceChildren(table('nodes',
      ['Node', 'Region', 'Status', 'Memory', { label: 'Runs', num: true }, { label: 'Heartbeat', num: true }, { label: 'Images', num: true }, ''],
      rows, 'No node has registered.'));
  }
  async function nodeAction(id, what) {
    try {
      await api('POST', `/v1/nodes/${encodeURIComponent(id)}/${what}`);
      toast(`${id}: ${what === 'drain' ? 'draining' : 'resumed'}`);
      await render();
    } catch (e) { showError(e); }
  }
  await render();
  every(2000, render);
}

// ---------------------------------------------------------------- queue

async function queuePage() {
  const pending = el('div');
  const running = el('div');
  page('Queue', el('p', { class: 'muted' }, isAdmin() ? 'Every project\'s runs that have not ended; refreshed every 2 s.' : 'Your runs that have not ended; refreshed every 2 s.'),
    el('h2', {}, 'Waiting'), pending, el('h2', {}, 'Running'), running);
  async function render() {
    const [p, r] = await Promise.all([
      api('GET', `/v1/runs?status=pending&limit=${PAGE * 4}`),
      api('GET', `/v1/runs?status=running&limit=${PAGE * 4}`),
    ]);
    pending.replaceChildren(table('queue', [{ label: 'Position', num: true }, 'Region', 'Run', 'Runner', 'Waiting', 'Reason'],
      p.runs.map(x => el('tr', { 'data-run-id': x.id },
        el('td', { class: 'num' }, x.queue_position ?? '—'), el('td', {}, x.region), el('td', {}, runLink(x)),
        el('td', { class: 'mono' }, x.runner_id), el('td', {}, waited(x)), el('td', { class: 'reason' }, x.pending_reason || '—'))),
      'Nothing waits.'));
    running.replaceChildren(table('running', ['Run', 'Runner', 'Node', 'Started'],
      r.runs.map(x => el('tr', { 'data-run-id': x.id }, el('td', {}, runLink(x)), el('td', { class: 'mono' }, x.runner_id),
        el('td', { class: 'mono' }, x.node_id || '—'), el('td', {}, when(x.started_at)))),
      'Nothing runs.'));
  }
  await render();
  every(2000, render);
}

// ---------------------------------------------------------------- runners

async function runnersPage() {
  const { runners } = await api('GET', '/v1/runners');
  page('Runners', table('runners', ['Name', 'Id', 'Region', 'Instance type', 'Image', 'Warm'],
    runners.map(r => el('tr', { 'data-runner-id': r.id },
      el('td', {}, el('a', { href: `#/runners/${r.id}` }, r.name)), el('td', { class: 'mono' }, r.id), el('td', {}, r.region),
      el('td', {}, r.instance_type), el('td', { class: 'mono' }, `${r.image_name}:${r.image_tag}`),
      el('td', {}, r.warmup_status || '—'))),
    'No runner yet: create one with the API or berthctl.'));
}

async function runnerPage(id) {
  const { runner } = await api('GET', `/v1/runners/${encodeURIComponent(id)}`);
  const runs = el('div');
  const more = el('button', { id: 'older', hidden: true }, 'Older runs');
  let after = null;
  const trigger = el('button', {
    id: 'trigger', class: 'primary',
    onclick: async () => {
      trigger.disabled = true;
      try {
        const { run } = await api('POST', `/v1/runners/${encodeURIComponent(id)}/runs`, {});
        location.hash = `#/runs/${id}/${run.id}`;
      } catch (e) { showError(e); } finally { trigger.disabled = false; }
    },
  }, 'Start a run');
  page(runner.name,
    el('div', { class: 'card' }, el('dl', {},
      el('dt', {}, 'Id'), el('dd', { class: 'mono' }, runner.id),
      el('dt', {}, 'Image'), el('dd', { class: 'mono' }, `${runner.image_name}:${runner.image_tag}`),
      el('dt', {}, 'Command'), el('dd', { class: 'mono' }, runner.run_command || (runner.argv || []).join(' ') || '(the image\'s)'),
      el('dt', {}, 'Region'), el('dd', {}, runner.region),
      el('dt', {}, 'Instance type'), el('dd', {}, runner.instance_type),
      el('dt', {}, 'Timeout'), el('dd', {}, `${runner.timeout_seconds} s`))),
    el('div', { class: 'toolbar' }, trigger),
    el('h2', {}, 'Recent runs'), runs, el('div', { class: 'toolbar' }, more));
  const tbody = el('tbody');
  runs.replaceChildren(el('table', { id: 'runs' },
    el('thead', {}, el('tr', {}, ['Run', 'Status', 'Created', 'Duration', 'Cost'].map(h => el('th', {}, h)))), tbody));
  async function load() {
    const q = new URLSearchParams({ order: 'desc', limit: PAGE });
    if (after) q.set('after', after);
    const p = await api('GET', `/v1/runners/${encodeURIComponent(id)}/runs?${q}`);
    for (const r of p.runs) {
      tbody.append(el('tr', { 'data-run-id': r.id }, el('td', {}, runLink(r)), el('td', {}, status(r.status)),
        el('td', {}, when(r.created_at)), el('td', {}, secs(r.duration_seconds)), el('td', {}, usd(r.cost_usd))));
    }
    if (!tbody.children.length) tbody.append(el('tr', {}, el('td', { colspan: 5, class: 'muted' }, 'No run yet.')));
    after = p.next_after;
    more.hidden = !after;
  }
  more.addEventListener('click', () => load().catch(showError));
  await load();
}

// ---------------------------------------------------------------- a run

/// Follows the run's SSE log stream with the key (EventSource cannot send one), resuming from
/// the last line seen after a dropped connection, until the `state` event.
async function follow(runner, run, onLine, onState, signal) {
  let last = null;
  while (!signal.aborted) {
    const headers = { Authorization: `Bearer ${key()}`, Accept: 'text/event-stream' };
    if (last !== null) headers['Last-Event-ID'] = String(last);
    try {
      const res = await fetch(`/v1/runners/${encodeURIComponent(runner)}/runs/${encodeURIComponent(run)}/logs/stream`, { headers, signal });
      if (!res.ok) throw new ApiError(res.status, null);
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          let event = 'message', data = '', id = null;
          for (const line of block.split('\n')) {
            if (line.startsWith('event: ')) event = line.slice(7);
            else if (line.startsWith('data: ')) data += line.slice(6);
            else if (line.startsWith('id: ')) id = line.slice(4);
          }
          if (event === 'log') { last = id; onLine(JSON.parse(data)); }
          else if (event === 'state') { onState(JSON.parse(data)); return; }
        }
      }
    } catch (e) {
      if (signal.aborted) return;
      if (e.status && e.status < 500) { showError(e); return; }
    }
    await new Promise(r => setTimeout(r, 1000));
  }
}

async function runPage(runnerId, runId) {
  const path = `/v1/runners/${encodeURIComponent(runnerId)}/runs/${encodeURIComponent(runId)}`;
  const details = el('div', { class: 'card' });
  const logs = el('pre', { id: 'logs' });
  const final = el('p', { id: 'final', class: 'muted' });
  const stop = el('button', {
    id: 'stop', class: 'danger',
    onclick: async () => {
      stop.disabled = true;
      try { await api('POST', `${path}/stop`); toast('Stopping'); await render(); } catch (e) { showError(e); stop.disabled = false; }
    },
  }, 'Stop');
  page(`Run ${runId}`, details, el('div', { class: 'toolbar' }, stop, el('a', { href: `#/runners/${runnerId}` }, 'Runner')),
    el('h2', {}, 'Logs'), logs, final);
  async function render() {
    const { run } = await api('GET', path);
    const active = run.status === 'pending' || run.status === 'running';
    stop.hidden = !active;
    details.replaceChildren(el('dl', {},
      el('dt', {}, 'Status'), el('dd', { id: 'run-status' }, status(run.status)),
      el('dt', {}, 'Exit code'), el('dd', { id: 'exit-code' }, run.exit_code ?? '—'),
      run.pending_reason ? [el('dt', {}, 'Waiting'), el('dd', {}, `${run.pending_reason}${run.queue_position ? ` (position ${run.queue_position})` : ''}`)] : null,
      run.error_message ? [el('dt', {}, 'Error'), el('dd', { class: 'error' }, run.error_message)] : null,
      el('dt', {}, 'Node'), el('dd', { class: 'mono' }, run.node_id || '—'),
      el('dt', {}, 'Image'), el('dd', { class: 'mono' }, run.image_digest ? `${run.image}@${run.image_digest}` : run.image),
      el('dt', {}, 'Created'), el('dd', {}, when(run.created_at)),
      el('dt', {}, 'Duration'), el('dd', {}, secs(run.duration_seconds)),
      el('dt', {}, 'Cost'), el('dd', {}, usd(run.cost_usd))));
    return run;
  }
  await render();
  const aborter = new AbortController();
  cleanup.push(() => aborter.abort());
  const refresh = setInterval(() => render().catch(showError), 2000);
  cleanup.push(() => clearInterval(refresh));
  follow(runnerId, runId,
    line => {
      logs.append(el('span', { class: line.stream, 'data-log-id': line.id }, `${line.msg}\n`));
      logs.scrollTop = logs.scrollHeight;
    },
    async state => {
      clearInterval(refresh);
      final.textContent = `Ended: ${state.status}${state.exit_code === null || state.exit_code === undefined ? '' : ` (exit code ${state.exit_code})`}`;
      final.dataset.status = state.status;
      await render().catch(showError);
    },
    aborter.signal);
}

// ---------------------------------------------------------------- usage

async function usagePage() {
  const u = await api('GET', '/v1/usage?group_by=day');
  page('Usage', el('p', { class: 'muted' }, `Runs that ended from ${when(u.from)} to ${when(u.to)}, per day (UTC).`),
    table('usage', ['Day', { label: 'Runs', num: true }, { label: 'Billed', num: true }, { label: 'Cost', num: true }],
      u.usage.map(r => el('tr', { 'data-day': r.key }, el('td', {}, r.key), el('td', { class: 'num' }, r.runs),
        el('td', { class: 'num' }, secs(r.billed_seconds)), el('td', { class: 'num' }, usd(r.cost_usd)))),
      'No run has ended in this period.'),
    el('p', { id: 'usage-total' }, `Total: ${secs(u.total.billed_seconds)}, ${usd(u.total.cost_usd)}`));
}

// ---------------------------------------------------------------- routing

async function route() {
  cleanup.forEach(f => f());
  cleanup = [];
  const parts = location.hash.replace(/^#\/?/, '').split('/').filter(Boolean);
  const loggedIn = !!key();
  document.getElementById('nav').hidden = !loggedIn;
  document.getElementById('logout').hidden = !loggedIn;
  document.getElementById('who').textContent = loggedIn ? (isAdmin() ? 'admin' : 'project key') : '';
  document.querySelectorAll('[data-admin]').forEach(a => { a.hidden = !isAdmin(); });
  document.querySelectorAll('nav a').forEach(a => a.classList.toggle('active', a.getAttribute('href') === `#/${parts[0] || ''}`));
  if (!loggedIn) return loginPage();
  try {
    switch (parts[0]) {
      case 'fleet': return await fleetPage();
      case 'queue': return await queuePage();
      case 'runners': return parts[1] ? await runnerPage(parts[1]) : await runnersPage();
      case 'runs': return await runPage(parts[1], parts[2]);
      case 'usage': return await usagePage();
      case 'login': return loginPage();
      default: location.hash = isAdmin() ? '#/fleet' : '#/runners';
    }
  } catch (e) {
    if (e.status === 401) return;
    page('Error', el('p', { id: 'page-error', class: 'error' }, e.status === 404 ? 'Not found (or not yours).' : e.message));
  }
}

window.addEventListener('hashchange', route);
window.addEventListener('DOMContentLoaded', () => {
  document.getElementById('logout').addEventListener('click', logout);
  route();
});
