// The dashboard shell: header, language switch, hash routes and live refresh.

import { apiKey, ApiFailure, signOut, whenSignedOut } from './api.js';
import { fill, h } from './dom.js';
import { LANGUAGES, preferredLanguage, setLanguage, t, language } from './i18n.js';
import { catalogPage } from './page-catalog.js';
import { deliveryPage } from './page-delivery.js';
import { endpointPage } from './page-endpoint.js';
import { endpointFormPage } from './page-form.js';
import { signInPage } from './page-signin.js';
import { webhooksPage } from './page-webhooks.js';

const LANGUAGE_KEY = 'laabam.language';
const REFRESH_MS = 2000;

// Hash routes (the key never enters a URL; only ids do).
const ROUTES = [
  [/^#\/endpoints\/new$/, () => endpointFormPage(null), 'nav_webhooks'],
  [/^#\/endpoints\/([\w-]+)\/edit$/, (id) => endpointFormPage(id), 'nav_webhooks'],
  [/^#\/endpoints\/([\w-]+)$/, (id) => endpointPage(id), 'nav_webhooks'],
  [/^#\/deliveries\/([\w-]+)$/, (id) => deliveryPage(id), 'nav_webhooks'],
  [/^#\/catalog$/, () => catalogPage(), 'nav_catalog'],
  [/^(#\/?)?$/, () => webhooksPage(), 'nav_webhooks'],
];

let generation = 0;
let timer = null;
let signInReason = null;

function banner(message) {
  const el = document.getElementById('banner');
  el.textContent = message || '';
  el.hidden = !message;
}

function describe(error) {
  if (error instanceof ApiFailure && error.status === 0) return error.message;
  if (error instanceof ApiFailure && error.status === 404) return t('not_found');
  return t('error_generic', { message: error.message });
}

function drawHeader(section) {
  const signedIn = Boolean(apiKey());
  const choose = h('select', { id: 'language', 'aria-label': t('language'), 'data-test': 'language' },
    Object.entries(LANGUAGES).map(([code, name]) => h('option', { value: code, selected: code === language(), lang: code }, name)));
  choose.addEventListener('change', () => {
    localStorage.setItem(LANGUAGE_KEY, choose.value);
    setLanguage(choose.value);
    render();
  });
  const link = (href, key) => h('a', { href, 'aria-current': section === key ? 'page' : null }, t(key));
  fill(document.getElementById('top'), 
    h('a', { class: 'brand', href: '#/' }, h('img', { src: 'favicon.svg', alt: '', width: 24, height: 24 }), t('brand')),
    signedIn ? h('nav', { 'aria-label': t('brand') }, link('#/', 'nav_webhooks'), link('#/catalog', 'nav_catalog')) : null,
    h('div', { class: 'top-tools' },
      choose,
      signedIn ? h('button', { type: 'button', class: 'button secondary', 'data-test': 'sign-out', onclick: () => signOut(null) }, t('sign_out')) : null));
  document.getElementById('skip').textContent = t('skip');
  document.title = t('brand');
}

function stopRefreshing() {
  clearTimeout(timer);
  timer = null;
}

// Redraws the data parts of the page every few seconds while it is visible; a failed refresh
// shows a banner and the next one tries again.
function keepRefreshing(refresh, mine) {
  const tick = async () => {
    if (mine !== generation) return;
    if (!document.hidden) {
      try {
        await refresh();
        banner(null);
      } catch (e) {
        if (mine === generation) banner(describe(e));
      }
    }
    if (mine === generation) timer = setTimeout(tick, REFRESH_MS);
  };
  timer = setTimeout(tick, REFRESH_MS);
}

function focusHeading(main) {
  (main.querySelector('h1') || main).setAttribute('tabindex', '-1');
  (main.querySelector('h1') || main).focus({ preventScroll: true });
}

async function render() {
  stopRefreshing();
  banner(null);
  const mine = ++generation;
  const main = document.getElementById('main');
  if (!apiKey()) {
    drawHeader(null);
    fill(main, signInPage(signInReason, () => {
      signInReason = null;
      render();
    }).node);
    main.querySelector('input')?.focus();
    return;
  }
  const [pattern, page, section] = ROUTES.find(([re]) => re.test(location.hash)) ?? ROUTES[ROUTES.length - 1];
  drawHeader(section);
  fill(main, h('p', { class: 'loading' }, t('loading')));
  try {
    const args = location.hash.match(pattern)?.slice(1) ?? [];
    const shown = await page(...args);
    if (mine !== generation) return;
    fill(main, shown.node);
    focusHeading(main);
    if (shown.refresh) keepRefreshing(shown.refresh, mine);
  } catch (e) {
    if (mine !== generation) return;
    fill(main, h('div', { class: 'empty', role: 'alert', 'data-test': 'page-error' },
      h('h1', {}, describe(e)),
      h('button', { type: 'button', class: 'button', onclick: render }, t('retry'))));
  }
}

whenSignedOut((reason) => {
  signInReason = reason;
  render();
});
setLanguage(preferredLanguage(localStorage.getItem(LANGUAGE_KEY), navigator.languages));
document.getElementById('skip').addEventListener('click', (event) => {
  event.preventDefault();
  focusHeading(document.getElementById('main'));
});
window.addEventListener('hashchange', render);
render();
