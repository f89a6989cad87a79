// How times, rates and labels read in the current language.

import { h } from './dom.js';
import { language, t } from './i18n.js';

// "2 minutes ago" (or "2 phút trước"), with the exact time on hover and for screen readers.
export function timeAgo(iso) {
  const seconds = (Date.parse(iso) - Date.now()) / 1000;
  const abs = Math.abs(seconds);
  const rtf = new Intl.RelativeTimeFormat(language(), { numeric: 'auto' });
  const text = abs < 45 ? rtf.format(Math.round(seconds), 'second')
    : abs < 45 * 60 ? rtf.format(Math.round(seconds / 60), 'minute')
      : abs < 18 * 3600 ? rtf.format(Math.round(seconds / 3600), 'hour')
        : rtf.format(Math.round(seconds / 86400), 'day');
  return h('time', { datetime: iso, title: exactTime(iso) }, text);
}

export function exactTime(iso) {
  return new Date(iso).toLocaleString(language());
}

// "99.8%"; a dash when there is nothing to divide.
export function percent(rate) {
  if (rate === null || rate === undefined) return t('no_data');
  return new Intl.NumberFormat(language(), { style: 'percent', maximumFractionDigits: 1 }).format(rate);
}

export function count(n) {
  return new Intl.NumberFormat(language()).format(n);
}

export function millis(ms) {
  return ms === null || ms === undefined ? t('no_data') : `${count(ms)} ms`;
}

// Green at 99% and up, amber from 90%, red below.
export function rateClass(rate) {
  if (rate === null || rate === undefined) return 'rate';
  return rate >= 0.99 ? 'rate rate-good' : rate >= 0.9 ? 'rate rate-warn' : 'rate rate-bad';
}

export function outcomeLabel(outcome) {
  return t(`outcome_${outcome}`);
}

// A delivery's status as a coloured badge.
export function deliveryBadge(status) {
  return h('span', { class: `badge badge-${status}`, 'data-test': 'delivery-status', 'data-status': status }, t(`status_${status}`));
}

// An endpoint's ACTIVE / DISABLED badge.
export function endpointBadge(ep) {
  return h('span', { class: `badge badge-${ep.status}`, 'data-test': 'endpoint-status' }, t(`status_${ep.status}`));
}

// Subscribed event types as chips.
export function eventChips(events) {
  const names = events ?? [t('all_types')];
  return h('ul', { class: 'chips', 'aria-label': t('field_events') }, names.map((name) => h('li', { class: 'chip' }, name)));
}
