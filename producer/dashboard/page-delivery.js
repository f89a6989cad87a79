// One delivery: its payload, every attempt with the receiver's answer, and Redeliver.

import { api } from './api.js';
import { fill, h, toast } from './dom.js';
import { count, deliveryBadge, exactTime, outcomeLabel, timeAgo } from './format.js';
import { t } from './i18n.js';

function facts(d, endpoint) {
  const row = (label, value) => h('div', {}, h('dt', {}, label), h('dd', {}, value));
  return h('dl', { class: 'facts wide' },
    row(t('col_status'), deliveryBadge(d.status)),
    row(t('col_type'), h('code', {}, d.event_type)),
    row(t('delivery_event'), h('code', {}, d.event_id)),
    row(t('delivery_endpoint'), endpoint ? h('a', { href: `#/endpoints/${d.endpoint_id}` }, endpoint.url) : h('code', {}, d.endpoint_id)),
    row(t('delivery_created'), timeAgo(d.created_at)),
    d.next_attempt_at && (d.status === 'pending' || d.status === 'retrying') ? row(t('delivery_next'), timeAgo(d.next_attempt_at)) : null,
    d.reason ? row(t('delivery_reason'), d.reason) : null);
}

function attempts(log) {
  if (!log || log.length === 0) return h('p', { class: 'empty-inline' }, t('no_attempts'));
  return h('div', { class: 'table-wrap' }, h('table', { 'data-test': 'attempts' },
    h('thead', {}, h('tr', {}, ['col_attempt', 'col_at', 'col_outcome', 'col_http', 'col_duration', 'col_response', 'col_error'].map((c) => h('th', { scope: 'col' }, t(c))))),
    h('tbody', {}, log.map((a) => h('tr', { 'data-test': 'attempt-row', 'data-outcome': a.outcome },
      h('td', { class: 'num' }, a.attempt),
      h('td', {}, h('time', { datetime: a.at }, exactTime(a.at))),
      h('td', {}, h('span', { class: `outcome outcome-${a.outcome}` }, outcomeLabel(a.outcome))),
      h('td', { class: 'num' }, a.status_code ?? ''),
      h('td', { class: 'num' }, `${count(a.duration_ms)} ms`),
      h('td', {}, a.response_excerpt ? h('pre', { class: 'excerpt' }, a.response_excerpt) : ''),
      h('td', {}, a.error ?? ''))))));
}

export async function deliveryPage(id) {
  let delivery = await api('GET', `/deliveries/${id}`);
  const [event, endpoint] = await Promise.all([
    api('GET', `/events/${delivery.event_id}`).catch(() => null),
    api('GET', `/endpoints/${delivery.endpoint_id}`).catch(() => null),
  ]);
  const factsBox = h('div');
  const attemptsBox = h('div');
  const draw = () => {
    fill(factsBox, facts(delivery, endpoint));
    fill(attemptsBox, attempts(delivery.attempt_log));
  };
  const refresh = async () => {
    delivery = await api('GET', `/deliveries/${id}`);
    draw();
  };
  const redeliver = h('button', { type: 'button', class: 'button', 'data-test': 'redeliver' }, t('redeliver'));
  redeliver.addEventListener('click', async () => {
    try {
      await api('POST', `/deliveries/${id}/redeliver`);
      toast(t('redelivered'));
      await refresh();
    } catch (e) {
      toast(e.message, 'error');
    }
  });
  draw();
  return {
    node: h('section', {},
      h('a', { class: 'back', href: endpoint ? `#/endpoints/${delivery.endpoint_id}` : '#/' }, endpoint ? `← ${endpoint.url}` : t('back_to_webhooks')),
      h('div', { class: 'page-head' },
        h('h1', {}, t('delivery_title'), ' ', h('code', { class: 'small' }, id)),
        h('div', { class: 'actions' }, redeliver)),
      h('p', { class: 'live' }, t('live')),
      h('section', { class: 'panel' }, factsBox),
      h('section', { class: 'panel', 'aria-labelledby': 'attempts-title' }, h('h2', { id: 'attempts-title' }, t('attempts_title')), attemptsBox),
      h('section', { class: 'panel', 'aria-labelledby': 'payload-title' },
        h('h2', { id: 'payload-title' }, t('payload')),
        h('pre', { class: 'code', tabindex: 0, 'data-test': 'payload' }, event ? JSON.stringify(event.event, null, 2) : t('not_found')))),
    refresh,
  };
}
