// Building the page: elements are made with text nodes only (never innerHTML), so no string from
// the API or a receiver's response can become markup.

import { t } from './i18n.js';

function build(el, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
    else if (value === true) el.setAttribute(name, '');
    else el.setAttribute(name, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false || child === '') continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

// An HTML element: `h('a', { href }, 'text', otherNode)`.
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

// Replaces an element's children; like `h`, it skips empty values and flattens arrays.
export function fill(el, ...children) {
  el.replaceChildren();
  return build(el, {}, children);
}

// An SVG element, for charts.
export function svg(tag, attrs, ...children) {
  return build(document.createElementNS('http://www.w3.org/2000/svg', tag), attrs, children);
}

// A short message in the live region, read out by screen readers.
export function toast(message, kind = 'ok') {
  const region = document.getElementById('toasts');
  const note = h('div', { class: `toast toast-${kind}`, role: kind === 'error' ? 'alert' : null }, message);
  region.append(note);
  while (region.children.length > 3) region.firstElementChild.remove();
  setTimeout(() => note.remove(), kind === 'error' ? 8000 : 5000);
}

// Asks before something that cannot be undone; resolves to whether the user confirmed.
export function confirmDialog({ title, body, confirm, danger = false }) {
  const dialog = document.getElementById('confirm');
  return new Promise((resolve) => {
    const cancel = h('button', { type: 'button', class: 'button secondary', onclick: () => dialog.close('cancel') }, t('cancel'));
    const ok = h('button', { type: 'button', class: `button ${danger ? 'danger' : ''}`, 'data-test': 'confirm', onclick: () => dialog.close('ok') }, confirm);
    dialog.replaceChildren(
      h('h2', { id: 'confirm-title' }, title),
      h('p', {}, body),
      h('div', { class: 'actions' }, cancel, ok),
    );
    dialog.setAttribute('aria-labelledby', 'confirm-title');
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
    dialog.returnValue = '';
    dialog.showModal();
    cancel.focus();
  });
}

// Copies text, falling back to the selection where the clipboard API is refused.
export async function copyText(text, input) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    input.select();
    document.execCommand('copy');
  }
}
