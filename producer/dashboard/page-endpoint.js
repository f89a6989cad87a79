// One endpoint: its state and actions, charts over time, signing secret, test sends, recovery of
// failed deliveries, and its deliveries with filters. Data parts refresh live; the controls
// the user is working with are never redrawn under them.

import { api, eventTypes, query } from './api.js';
import { latencyChart, outcomesChart } from './charts.js';
import { confirmDialog, copyText, fill, h, toast } from './dom.js';
import { count, deliveryBadge, endpointBadge, eventChips, exactTime, millis, percent, rateClass, timeAgo } from './format.js';
import { t } from './i18n.js';

const STATUSES = ['pending', 'retrying', 'succeeded', 'failed'];
const PAGE = 25;

function failed(e) {
  toast(e.message, 'error');
}

function header(ep, reload) {
  const toggle = async () => {
    try {
      await api('PATCH', `/endpoints/${ep.id}`, { enabled: !ep.enabled });
      toast(ep.enabled ? t('disabled_toast') : t('enabled_toast'));
      await reload();
    } catch (e) {
      failed(e);
    }
  };
  const remove = async () => {
    const sure = await confirmDialog({ title: t('delete_title'), body: t('delete_body', { url: ep.url }), confirm: t('delete_confirm'), danger: true });
    if (!sure) return;
    try {
      await api('DELETE', `/endpoints/${ep.id}`);
      toast(t('deleted'));
      location.hash = '#/';
    } catch (e) {
      failed(e);
    }
  };
  return h('div', { class: 'endpoint-head' },
    h('a', { href: '#/', class: 'back' }, t('back_to_webhooks')),
    h('div', { class: 'page-head' },
      h('div', {},
        h('h1', { class: 'url' }, ep.url, ' ', endpointBadge(ep)),
        ep.description ? h('p', { class: 'muted' }, ep.description) : null,
        ep.disabled_reason ? h('p', { class: 'warn', 'data-test': 'disabled-reason' }, t('disabled_because', { reason: ep.disabled_reason })) : null,
        eventChips(ep.events),
        h('p', { class: 'muted small' }, t('created_at', { time: exactTime(ep.created_at) }))),
      h('div', { class: 'actions' },
        h('a', { class: 'button secondary', href: `#/endpoints/${ep.id}/edit`, 'data-test': 'edit' }, t('edit')),
        h('button', { type: 'button', class: 'button secondary', onclick: toggle, 'data-test': 'toggle' }, ep.enabled ? t('disable') : t('enable')),
        h('button', { type: 'button', class: 'button danger', onclick: remove, 'data-test': 'delete' }, t('delete')))));
}

function summary(ep, stats, windowName) {
  const w = windowName === '1h' ? stats.last_1h : stats.last_24h;
  const fact = (label, value, attrs = {}) => h('div', { class: 'stat' }, h('dt', {}, label), h('dd', attrs, value));
  return h('dl', { class: 'stats' },
    fact(t('success_rate'), percent(w.success_rate), { class: rateClass(w.success_rate), 'data-test': 'window-success-rate' }),
    fact(t('attempts_label'), count(w.attempts)),
    fact(t('latency_p50'), millis(w.latency_p50_ms)),
    fact(t('latency_p95'), millis(w.latency_p95_ms)),
    fact(t('last_delivery'), ep.last_delivery ? timeAgo(ep.last_delivery.at) : t('no_deliveries_yet')));
}

function secretSection(ep) {
  const box = h('div', { class: 'secret-box' });
  let shown = false;
  const draw = (secret) => {
    const input = h('input', { id: 'secret', readonly: true, value: secret.secret, class: 'mono', 'aria-label': t('secret_label'), 'data-test': 'secret' });
    fill(box,
      h('div', { class: 'inline' }, input,
        h('button', { type: 'button', class: 'button secondary', onclick: async () => { await copyText(secret.secret, input); toast(t('secret_copied')); } }, t('secret_copy'))),
      secret.previous.map((p) => h('p', { class: 'muted small' }, t('secret_previous', { time: exactTime(p.expires_at) }))));
  };
  const reveal = h('button', { type: 'button', class: 'button secondary', 'data-test': 'reveal', 'aria-expanded': 'false' }, t('secret_reveal'));
  reveal.addEventListener('click', async () => {
    if (shown) {
      box.replaceChildren();
      shown = false;
    } else {
      try {
        draw(await api('GET', `/endpoints/${ep.id}/secret`));
        shown = true;
      } catch (e) {
        return failed(e);
      }
    }
    reveal.textContent = shown ? t('secret_hide') : t('secret_reveal');
    reveal.setAttribute('aria-expanded', String(shown));
  });
  const rotate = async () => {
    if (!(await confirmDialog({ title: t('secret_rotate_title'), body: t('secret_rotate_body'), confirm: t('secret_rotate') }))) return;
    try {
      draw(await api('POST', `/endpoints/${ep.id}/secret/rotate`));
      shown = true;
      reveal.textContent = t('secret_hide');
      reveal.setAttribute('aria-expanded', 'true');
      toast(t('secret_rotated'));
    } catch (e) {
      failed(e);
    }
  };
  return h('section', { class: 'panel', 'aria-labelledby': 'secret-title' },
    h('h2', { id: 'secret-title' }, t('secret_title')),
    h('p', { class: 'muted' }, t('secret_intro')),
    h('div', { class: 'actions left' }, reveal, h('button', { type: 'button', class: 'button secondary', onclick: rotate, 'data-test': 'rotate' }, t('secret_rotate'))),
    box);
}

function testSection(ep, types, onSent) {
  const select = h('select', { id: 'test-type', 'data-test': 'test-type' }, types.map((type) => h('option', { value: type.name }, type.name)));
  const button = h('button', { type: 'submit', class: 'button', 'data-test': 'send-test' }, t('test_send'));
  const hint = h('p', { class: 'hint', hidden: ep.enabled }, t('test_disabled'));
  const form = h('form', { class: 'inline' },
    h('label', { for: 'test-type' }, t('test_type')), select, button);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    try {
      await api('POST', `/endpoints/${ep.id}/test`, { type: select.value });
      toast(t('test_sent'));
      await onSent();
    } catch (e) {
      failed(e);
    }
  });
  const sync = (current) => {
    button.disabled = !current.enabled;
    hint.hidden = current.enabled;
  };
  sync(ep);
  return { sync, node: h('section', { class: 'panel', 'aria-labelledby': 'test-title' },
    h('h2', { id: 'test-title' }, t('test_title')), h('p', { class: 'muted' }, t('test_intro')), form, hint) };
}

function localInputValue(date) {
  const shifted = new Date(date.getTime() - date.getTimezoneOffset() * 60000);
  return shifted.toISOString().slice(0, 16);
}

function recoverSection(ep, onRecovered) {
  const since = h('input', { id: 'recover-since', type: 'datetime-local', required: true, value: localInputValue(new Date(Date.now() - 24 * 3600 * 1000)) });
  const form = h('form', { class: 'inline' },
    h('label', { for: 'recover-since' }, t('recover_since')), since,
    h('button', { type: 'submit', class: 'button secondary', 'data-test': 'recover' }, t('recover_submit')));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    try {
      const done = await api('POST', `/endpoints/${ep.id}/recover`, { since: new Date(since.value).toISOString() });
      toast(t('recovered', { n: count(done.redelivered) }));
      await onRecovered();
    } catch (e) {
      failed(e);
    }
  });
  return h('section', { class: 'panel', 'aria-labelledby': 'recover-title' },
    h('h2', { id: 'recover-title' }, t('recover_title')), h('p', { class: 'muted' }, t('recover_intro')), form);
}

function deliveryRow(d) {
  return h('tr', { 'data-test': 'delivery-row', 'data-delivery': d.id, 'data-status': d.status },
    h('td', {}, timeAgo(d.created_at)),
    h('td', {}, h('code', {}, d.event_type)),
    h('td', {}, deliveryBadge(d.status)),
    h('td', { class: 'num' }, count(d.attempts)),
    h('td', {}, h('a', { href: `#/deliveries/${d.id}`, 'aria-label': `${t('view')} ${d.id}` }, t('view'))));
}

export async function endpointPage(id) {
  const types = await eventTypes();
  let ep = await api('GET', `/endpoints/${id}`);
  let windowName = '1h';
  let limit = PAGE;

  const head = h('div');
  const statsBox = h('div', { 'data-test': 'stats' });
  const tableBox = h('div');
  const filters = {
    status: h('select', { id: 'filter-status', 'data-test': 'filter-status' },
      h('option', { value: '' }, t('filter_any')), STATUSES.map((s) => h('option', { value: s }, t(`status_${s}`)))),
    event_type: h('select', { id: 'filter-type' },
      h('option', { value: '' }, t('filter_any')), types.map((type) => h('option', { value: type.name }, type.name))),
  };

  let drawnHead = '';
  const drawHead = () => {
    const shape = JSON.stringify({ ...ep, last_delivery: null, success_rate_24h: null });
    if (shape !== drawnHead) {
      fill(head, header(ep, reload));
      drawnHead = shape;
    }
  };
  const loadStats = async () => {
    const stats = await api('GET', `/endpoints/${id}/stats`);
    const points = windowName === '1h' ? stats.series_1h : stats.series_24h;
    const w = windowName === '1h' ? stats.last_1h : stats.last_24h;
    fill(statsBox, summary(ep, stats, windowName),
      w.attempts ? h('div', { class: 'charts' }, outcomesChart(points), latencyChart(points)) : h('p', { class: 'empty-inline' }, t('chart_empty')));
  };
  const loadDeliveries = async () => {
    const page = await api('GET', `/deliveries${query({ endpoint_id: id, status: filters.status.value, event_type: filters.event_type.value, limit })}`);
    const more = page.next_cursor && limit < 250
      ? h('button', { type: 'button', class: 'button secondary', onclick: async () => { limit = Math.min(250, limit + PAGE); await loadDeliveries(); } }, t('load_more'))
      : null;
    fill(tableBox, page.data.length
      ? h('div', { class: 'table-wrap' }, h('table', { 'data-test': 'deliveries' },
        h('thead', {}, h('tr', {}, ['col_time', 'col_type', 'col_status', 'col_attempts', 'col_id'].map((c) => h('th', { scope: 'col' }, t(c))))),
        h('tbody', {}, page.data.map(deliveryRow))))
      : h('p', { class: 'empty-inline', 'data-test': 'deliveries-empty' }, t('deliveries_empty')),
    more);
  };
  const test = testSection(ep, types, () => loadDeliveries());
  async function reload() {
    ep = await api('GET', `/endpoints/${id}`);
    drawHead();
    test.sync(ep);
    await Promise.all([loadStats(), loadDeliveries()]);
  }
  Object.values(filters).forEach((f) => f.addEventListener('change', () => { limit = PAGE; loadDeliveries().catch(failed); }));

  const windowButtons = ['1h', '24h'].map((name) => {
    const b = h('button', { type: 'button', class: 'button toggle', 'aria-pressed': String(name === windowName) }, t(`window_${name}`));
    b.addEventListener('click', () => {
      windowName = name;
      windowButtons.forEach((other) => other.setAttribute('aria-pressed', String(other === b)));
      loadStats().catch(failed);
    });
    return b;
  });

  await reload();
  return {
    node: h('section', {},
      head,
      h('p', { class: 'live' }, t('live')),
      h('section', { class: 'panel', 'aria-labelledby': 'stats-title' },
        h('div', { class: 'page-head' }, h('h2', { id: 'stats-title' }, t('stats_title')), h('div', { class: 'actions', role: 'group' }, windowButtons)),
        statsBox),
      h('div', { class: 'columns' }, test.node, recoverSection(ep, loadDeliveries)),
      secretSection(ep),
      h('section', { class: 'panel', 'aria-labelledby': 'deliveries-title' },
        h('h2', { id: 'deliveries-title' }, t('deliveries_title')),
        h('div', { class: 'inline filters' },
          h('label', { for: 'filter-status' }, t('filter_status')), filters.status,
          h('label', { for: 'filter-type' }, t('filter_type')), filters.event_type),
        tableBox)),
    refresh: reload,
  };
}
