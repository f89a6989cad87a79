// "Your webhooks": every endpoint with its status, subscriptions, last delivery and success rate.

import { api } from './api.js';
import { fill, h } from './dom.js';
import { endpointBadge, eventChips, outcomeLabel, percent, rateClass, timeAgo } from './format.js';
import { t } from './i18n.js';

function lastDelivery(last) {
  if (!last) return t('no_deliveries_yet');
  const code = last.status_code ? ` (${last.status_code})` : '';
  return h('a', { href: `#/deliveries/${last.delivery_id}`, class: `outcome outcome-${last.outcome}` },
    timeAgo(last.at), ` · ${outcomeLabel(last.outcome)}${code}`);
}

function card(ep) {
  return h('article', { class: 'card', 'data-test': 'endpoint-card', 'data-endpoint': ep.id },
    h('div', { class: 'card-head' },
      h('h2', { class: 'url' }, h('a', { href: `#/endpoints/${ep.id}` }, ep.url)),
      endpointBadge(ep)),
    ep.description ? h('p', { class: 'muted' }, ep.description) : null,
    ep.disabled_reason ? h('p', { class: 'warn' }, t('disabled_because', { reason: ep.disabled_reason })) : null,
    eventChips(ep.events),
    h('dl', { class: 'facts' },
      h('div', {}, h('dt', {}, t('last_delivery')), h('dd', { 'data-test': 'last-delivery' }, lastDelivery(ep.last_delivery))),
      h('div', {}, h('dt', {}, t('success_rate_24h')),
        h('dd', { 'data-test': 'success-rate', class: rateClass(ep.success_rate_24h) }, percent(ep.success_rate_24h)))));
}

function empty() {
  return h('div', { class: 'empty', 'data-test': 'empty' },
    h('h2', {}, t('empty_title')),
    h('p', {}, t('empty_body')),
    h('a', { class: 'button', href: '#/endpoints/new' }, t('add_endpoint')));
}

export async function webhooksPage() {
  const list = h('div', { class: 'cards', 'data-test': 'endpoint-list' });
  const refresh = async () => {
    const endpoints = [];
    // Every page: an account has at most a few hundred endpoints (LAABAM_MAX_ENDPOINTS_PER_ACCOUNT).
    for (let cursor = ''; ;) {
      const page = await api('GET', `/endpoints?limit=250${cursor && `&cursor=${encodeURIComponent(cursor)}`}`);
      endpoints.push(...page.data);
      if (!page.next_cursor) break;
      cursor = page.next_cursor;
    }
    fill(list, endpoints.length ? endpoints.map(card) : empty());
  };
  await refresh();
  return {
    node: h('section', {},
      h('div', { class: 'page-head' },
        h('div', {}, h('h1', {}, t('webhooks_title')), h('p', { class: 'muted' }, t('webhooks_intro'))),
        h('a', { class: 'button', href: '#/endpoints/new', 'data-test': 'add-endpoint' }, t('add_endpoint'))),
      h('p', { class: 'live' }, t('live')),
      list),
    refresh,
  };
}
