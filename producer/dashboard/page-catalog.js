// The event catalog, with receivers that verify signatures. The receiver examples are the same
// files the browser test runs against real deliveries, so they cannot drift from what works.

import { eventTypes } from './api.js';
import { h } from './dom.js';
import { eventDescription, t } from './i18n.js';

async function source(file) {
  const response = await fetch(`/dashboard/${file}`);
  return response.ok ? response.text() : '';
}

export async function catalogPage() {
  const [types, node, python] = await Promise.all([eventTypes(), source('example-receiver.js'), source('example-receiver.py')]);
  const code = (label, text, test) => h('details', { class: 'code-box' },
    h('summary', {}, label), h('pre', { class: 'code', tabindex: 0, 'data-test': test }, text));
  return {
    node: h('section', {},
      h('h1', {}, t('catalog_title')),
      h('p', { class: 'muted' }, t('catalog_intro')),
      h('div', { class: 'cards' }, types.map((type) => h('article', { class: 'card', id: `type-${type.name}`, 'data-test': 'event-type' },
        h('h2', {}, h('code', {}, type.name)),
        h('p', {}, eventDescription(type)),
        code(t('catalog_schema'), JSON.stringify(type.schema, null, 2), 'schema'),
        code(t('catalog_example'), JSON.stringify(type.example, null, 2), 'example')))),
      h('section', { class: 'panel', 'aria-labelledby': 'receiver-title' },
        h('h2', { id: 'receiver-title' }, t('receiver_title')),
        h('p', {}, t('receiver_intro')),
        code(t('receiver_node'), node, 'receiver-node'),
        code(t('receiver_python'), python, 'receiver-python'))),
  };
}
