// The dashboard's only way to the data: the public /v1 API, with the key from this tab's session
// storage in the Authorization header (never in a URL, so it stays out of logs and history).

import { t } from './i18n.js';

const KEY = 'laabam.apiKey';

// An API answer other than 2xx, with the API's own message (or, when the server cannot be
// reached, a translated one) and the field to blame.
export class ApiFailure extends Error {
  constructor(status, body, fallback) {
    super(body?.error?.message || fallback || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code;
    this.field = body?.error?.field;
  }
}

let onSignedOut = () => {};

export function apiKey() {
  return sessionStorage.getItem(KEY);
}

export function signIn(key) {
  sessionStorage.setItem(KEY, key);
}

// Forgets the key; `reason` is shown on the sign-in page.
export function signOut(reason) {
  sessionStorage.removeItem(KEY);
  onSignedOut(reason);
}

export function whenSignedOut(callback) {
  onSignedOut = callback;
}

// Calls the API; throws ApiFailure (status 0 when the server cannot be reached).
export async function api(method, path, body, key = apiKey()) {
  let response;
  try {
    response = await fetch(`/v1${path}`, {
      method,
      cache: 'no-store',
      headers: {
        Authorization: `Bearer ${key}`,
        ...(body === undefined ? {} : { 'Content-Type': 'application/json' }),
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiFailure(0, null, t('error_network'));
  }
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  if (response.status === 401 && key === apiKey() && key) {
    signOut('session_expired');
  }
  if (!response.ok) throw new ApiFailure(response.status, json);
  return json;
}

// A query string from the set values of `params`.
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== '' && v !== null && v !== undefined) q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : '';
}

let catalog = null;

// The event catalog, read once per page load (it changes only with the binary).
export async function eventTypes() {
  catalog ??= await api('GET', '/event-types');
  return catalog;
}
