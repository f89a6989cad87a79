// Adding or editing an endpoint: URL, description, event types from the catalog, rate limit.

import { api, eventTypes } from './api.js';
import { h, toast } from './dom.js';
import { eventDescription, t } from './i18n.js';

// The form control the API blamed (`events[2]` → the event type list).
function fieldFor(form, field) {
  const name = (field || '').split(/[.[]/)[0];
  return form.querySelector(`[data-field="${name}"]`);
}

export async function endpointFormPage(id) {
  const types = await eventTypes();
  const ep = id ? await api('GET', `/endpoints/${id}`) : null;
  const subscribed = new Set(ep?.events ?? []);
  const allTypes = !ep || ep.events === null;

  const url = h('input', { id: 'f-url', name: 'url', type: 'url', required: true, 'data-field': 'url', value: ep?.url ?? '', placeholder: 'https://example.com/webhooks', 'aria-describedby': 'f-url-hint' });
  const description = h('input', { id: 'f-description', name: 'description', 'data-field': 'description', value: ep?.description ?? '', maxlength: 1024 });
  const rate = h('input', { id: 'f-rate', name: 'rate_limit', type: 'number', min: 1, step: 1, inputmode: 'numeric', 'data-field': 'rate_limit', value: ep?.rate_limit ?? '', 'aria-describedby': 'f-rate-hint' });
  const all = h('input', { type: 'radio', name: 'scope', id: 'f-all', value: 'all', checked: allTypes });
  const some = h('input', { type: 'radio', name: 'scope', id: 'f-some', value: 'some', checked: !allTypes });
  const boxes = types.map((type) => h('input', { type: 'checkbox', name: 'events', value: type.name, id: `f-type-${type.name}`, checked: subscribed.has(type.name) }));
  const typeList = h('ul', { class: 'type-picks', 'data-field': 'events' }, types.map((type, i) =>
    h('li', {}, boxes[i], h('label', { for: boxes[i].id }, h('code', {}, type.name), h('span', { class: 'muted' }, ` ${eventDescription(type)}`)))));
  const syncScope = () => boxes.forEach((b) => { b.disabled = all.checked; });
  all.addEventListener('change', syncScope);
  some.addEventListener('change', syncScope);
  syncScope();

  const error = h('p', { class: 'form-error', role: 'alert', hidden: true, 'data-test': 'form-error' });
  const form = h('form', { class: 'panel form', novalidate: true });
  const fail = (message, control) => {
    error.textContent = message;
    error.hidden = false;
    form.querySelectorAll('[aria-invalid]').forEach((el) => el.removeAttribute('aria-invalid'));
    if (control) {
      control.setAttribute('aria-invalid', 'true');
      (control.matches('input') ? control : control.querySelector('input'))?.focus();
    }
  };
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const picked = boxes.filter((b) => b.checked).map((b) => b.value);
    if (some.checked && picked.length === 0) return fail(t('events_pick_one'), typeList);
    const body = {
      url: url.value.trim(),
      description: description.value.trim(),
      events: all.checked ? null : picked,
      rate_limit: rate.value === '' ? null : Number(rate.value),
    };
    try {
      const saved = id ? await api('PATCH', `/endpoints/${id}`, body) : await api('POST', '/endpoints', body);
      toast(id ? t('saved') : t('created'));
      location.hash = `#/endpoints/${saved.id}`;
    } catch (e) {
      fail(e.message, fieldFor(form, e.field));
    }
  });

  form.append(
    h('div', { class: 'field' }, h('label', { for: 'f-url' }, t('field_url')), url, h('p', { id: 'f-url-hint', class: 'hint' }, t('field_url_hint'))),
    h('div', { class: 'field' }, h('label', { for: 'f-description' }, t('field_description')), description),
    h('fieldset', { class: 'field' }, h('legend', {}, t('field_events')),
      h('div', { class: 'radio' }, all, h('label', { for: 'f-all' }, t('events_all'))),
      h('div', { class: 'radio' }, some, h('label', { for: 'f-some' }, t('events_some'))),
      typeList),
    h('div', { class: 'field' }, h('label', { for: 'f-rate' }, t('field_rate_limit')), rate, h('p', { id: 'f-rate-hint', class: 'hint' }, t('field_rate_limit_hint'))),
    error,
    h('div', { class: 'actions' },
      h('a', { class: 'button secondary', href: id ? `#/endpoints/${id}` : '#/' }, t('cancel')),
      h('button', { type: 'submit', class: 'button', 'data-test': 'save-endpoint' }, id ? t('save') : t('create'))));

  return {
    node: h('section', {},
      h('a', { href: id ? `#/endpoints/${id}` : '#/', class: 'back' }, id ? ep.url : t('back_to_webhooks')),
      h('h1', {}, id ? t('form_edit_title') : t('form_new_title')),
      form),
  };
}
