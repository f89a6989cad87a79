// Signing in: the key is checked against the API before it is kept for this tab.

import { api, ApiFailure, signIn } from './api.js';
import { h } from './dom.js';
import { t } from './i18n.js';

export function signInPage(reason, onSignedIn) {
  const error = h('p', { id: 'signin-error', class: 'form-error', role: 'alert', hidden: !reason }, reason ? t(reason) : '');
  const input = h('input', {
    id: 'api-key', name: 'api-key', type: 'password', autocomplete: 'off', spellcheck: 'false',
    required: true, 'aria-describedby': 'signin-error', 'aria-invalid': reason ? 'true' : null,
  });
  const fail = (key) => {
    error.textContent = t(key);
    error.hidden = false;
    input.setAttribute('aria-invalid', 'true');
    input.focus();
  };
  const submit = async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key.startsWith('lbk_')) return fail('signin_format');
    try {
      await api('GET', '/endpoints?limit=1', undefined, key);
    } catch (e) {
      if (e instanceof ApiFailure && (e.status === 401 || e.status === 403)) return fail('signin_bad_key');
      return fail(e.status === 0 ? 'error_network' : 'signin_bad_key');
    }
    input.value = '';
    signIn(key);
    onSignedIn();
  };
  return {
    node: h('section', { class: 'signin panel' },
      h('h1', {}, t('signin_title')),
      h('p', {}, t('signin_intro')),
      h('form', { onsubmit: submit, novalidate: true },
        h('label', { for: 'api-key' }, t('signin_key')),
        input,
        error,
        h('button', { type: 'submit', class: 'button' }, t('signin_submit')))),
  };
}
