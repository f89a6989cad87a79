// Drives the account owner's dashboard in a real headless Chromium against the running stack
// (started by tests/tests/dashboard.rs, which passes everything through the environment), and
// saves a screenshot of each main page. Exits non-zero with the failed step on any failure.

import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const BASE = env('BASE_URL');
const KEY = env('OWNER_KEY');
const EXAMPLES_KEY = env('EXAMPLES_KEY');
const OK_URL = env('OK_URL');
const FAIL_URL = env('FAIL_URL');
const SHOTS = env('SCREENSHOTS');
const WAIT = 20_000;
mkdirSync(SHOTS, { recursive: true });

let current = 'start';
function step(name) {
  current = name;
  console.log(`step: ${name}`);
}
function check(condition, message) {
  if (!condition) throw new Error(message);
}
async function shot(page, name) {
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
});
const context = await browser.newContext({ locale: 'en-US', viewport: { width: 1280, height: 900 } });
await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: BASE });
const page = await context.newPage();
page.setDefaultTimeout(WAIT);
const pageErrors = [];
const requests = [];
page.on('pageerror', (e) => pageErrors.push(e.message));
page.on('request', (r) => requests.push(r.url()));

const text = (selector) => page.locator(selector).first().innerText();
const card = (id) => page.locator(`[data-test=endpoint-card][data-endpoint="${id}"]`);
const endpointIdFromUrl = () => new URL(page.url()).hash.split('/')[2];
async function sendTest(type) {
  await page.selectOption('[data-test=test-type]', type);
  await page.click('[data-test=send-test]');
}
async function openEndpoint(id) {
  await page.goto(`${BASE}/dashboard/#/endpoints/${id}`);
  await page.locator('[data-test=send-test]').waitFor();
}
async function editUrl(id, url) {
  await page.goto(`${BASE}/dashboard/#/endpoints/${id}/edit`);
  await page.fill('#f-url', url);
  await page.click('[data-test=save-endpoint]');
  await page.waitForFunction((u) => document.querySelector('h1.url')?.textContent.includes(u), url);
}

try {
  step('the root redirects to the dashboard, which asks for a key and refuses a wrong one');
  await page.goto(`${BASE}/`);
  check(page.url().startsWith(`${BASE}/dashboard/`), `landed on ${page.url()}`);
  await page.locator('#api-key').waitFor();
  check(await page.evaluate(() => document.activeElement?.id) === 'api-key', 'the key field has focus');
  await page.keyboard.type('lbk_not-a-real-key');
  await page.keyboard.press('Enter');
  await page.locator('#signin-error', { hasText: 'not accepted' }).waitFor();
  await shot(page, '01-sign-in');

  step('signing in with the keyboard shows the empty state');
  await page.fill('#api-key', KEY);
  await page.keyboard.press('Enter');
  await page.locator('[data-test=empty]').waitFor();
  check(!page.url().includes(KEY), 'the key never enters the URL');
  check(await page.evaluate(() => sessionStorage.getItem('laabam.apiKey')) === KEY, 'the key is kept in the session');
  check(await page.evaluate(() => localStorage.getItem('laabam.apiKey')) === null, 'the key is not kept beyond the session');
  await shot(page, '02-empty');

  step('adding an endpoint: a bad URL is refused with the API message, then it is created');
  await page.click('[data-test=add-endpoint]');
  await page.locator('#f-url').waitFor();
  await page.fill('#f-url', 'ftp://example');
  await page.fill('#f-description', 'Billing sync');
  await page.click('[data-test=save-endpoint]');
  await page.locator('[data-test=form-error]').waitFor();
  check(await page.getAttribute('#f-url', 'aria-invalid') === 'true', 'the URL field is marked invalid');
  await page.check('#f-some');
  await page.click('[data-test=save-endpoint]');
  await page.locator('[data-test=form-error]', { hasText: 'at least one' }).waitFor();
  await page.check('input[value="invoice.paid"]');
  await page.check('input[value="payment.failed"]');
  await page.fill('#f-url', OK_URL);
  await page.fill('#f-rate', '50');
  await page.click('[data-test=save-endpoint]');
  await page.locator('[data-test=send-test]').waitFor();
  const id = endpointIdFromUrl();
  check((await text('h1')).includes(OK_URL), 'the endpoint page shows its URL');

  step('a test event appears as delivered without a reload');
  await sendTest('invoice.paid');
  await page.locator('[data-test=delivery-row][data-status=succeeded]').waitFor();
  await page.locator('[data-test=window-success-rate]', { hasText: '100%' }).waitFor();
  await page.locator('svg.chart rect.fill-success').first().waitFor();
  await shot(page, '03-endpoint');

  step('"Your webhooks" shows the endpoint as on the product page');
  await page.click('nav >> text=Your webhooks');
  await card(id).waitFor();
  check(await card(id).locator('[data-test=endpoint-status]').innerText() === 'ACTIVE', 'status badge ACTIVE');
  const chips = await card(id).locator('.chip').allInnerTexts();
  check(chips.join(',') === 'invoice.paid,payment.failed', `chips ${chips}`);
  check(await card(id).locator('[data-test=success-rate]').innerText() === '100%', 'success rate 100%');
  const last = await card(id).locator('[data-test=last-delivery]').innerText();
  check(/(ago|now) · Success \(200\)/.test(last), `last delivery reads "${last}"`);
  await shot(page, '04-webhooks');

  step('while the receiver fails, deliveries fail and the success rate drops');
  await editUrl(id, FAIL_URL);
  await sendTest('payment.failed');
  await page.locator('[data-test=delivery-row][data-status=failed]').waitFor();
  await sendTest('invoice.paid');
  await page.waitForFunction(() => document.querySelectorAll('[data-test=delivery-row][data-status=failed]').length === 2);
  await page.click('nav >> text=Your webhooks');
  await card(id).locator('[data-test=success-rate].rate-bad').waitFor();
  const dropped = await card(id).locator('[data-test=success-rate]').innerText();
  check(dropped === '20%', `success rate after failures is ${dropped} (1 of 5 attempts succeeded)`);
  check((await card(id).locator('[data-test=last-delivery]').innerText()).includes('Server error (5xx) (500)'), 'the last delivery shows the failure');

  step('a failed delivery shows every attempt and is redelivered once the receiver is back');
  await editUrl(id, OK_URL);
  await page.selectOption('[data-test=filter-status]', 'failed');
  await page.waitForFunction(() => document.querySelectorAll('[data-test=delivery-row]').length === 2
    && [...document.querySelectorAll('[data-test=delivery-row]')].every((r) => r.dataset.status === 'failed'));
  await page.locator('[data-test=delivery-row] a').first().click();
  await page.locator('[data-test=attempts]').waitFor();
  check(await page.locator('[data-test=attempt-row][data-outcome=http_5xx]').count() === 2, 'two failed attempts listed');
  check((await text('[data-test=attempts]')).includes('answered 500'), 'the response excerpt is shown');
  check((await text('[data-test=payload]')).includes('"type"'), 'the payload is shown');
  await page.click('[data-test=redeliver]');
  await page.locator('[data-test=delivery-status][data-status=succeeded]').waitFor();
  await page.locator('[data-test=attempt-row][data-outcome=success]').waitFor();
  await shot(page, '05-delivery');

  step('"Recover failed since" sends the other failed delivery again');
  await openEndpoint(id);
  await page.click('[data-test=recover]');
  await page.locator('.toast', { hasText: 'queued again: 1' }).waitFor();
  await page.selectOption('[data-test=filter-status]', 'failed');
  await page.locator('[data-test=deliveries-empty]').waitFor();
  await page.selectOption('[data-test=filter-status]', 'succeeded');
  await page.waitForFunction(() => document.querySelectorAll('[data-test=delivery-row][data-status=succeeded]').length === 3);

  step('the signing secret is revealed, copied and rotated');
  await page.click('[data-test=reveal]');
  const first = await page.inputValue('[data-test=secret]');
  check(first.startsWith('whsec_'), 'a whsec_ secret is revealed');
  await page.click('text=Copy');
  check(await page.evaluate(() => navigator.clipboard.readText()) === first, 'the secret is on the clipboard');
  await page.click('[data-test=rotate]');
  await page.click('[data-test=confirm]');
  await page.waitForFunction((old) => document.querySelector('[data-test=secret]')?.value !== old, first);
  await page.locator('text=Previous secret, still signing until').waitFor();

  step('disabling stops test sends; enabling restores them');
  await page.click('[data-test=toggle]');
  await page.locator('[data-test=disabled-reason]', { hasText: 'disabled by its owner' }).waitFor();
  check(await page.isDisabled('[data-test=send-test]'), 'test sends are off while disabled');
  await page.click('[data-test=toggle]');
  await page.locator('[data-test=endpoint-status]', { hasText: 'Active' }).waitFor();
  check(!(await page.isDisabled('[data-test=send-test]')), 'test sends are back');

  step('the event catalog shows every type with schema, example and receiver examples');
  await page.click('nav >> text=Event catalog');
  await page.locator('[data-test=event-type]').first().waitFor();
  check(await page.locator('[data-test=event-type]').count() >= 5, 'every catalog type is listed');
  for (const summary of await page.locator('details summary').all()) await summary.click();
  check((await text('[data-test=receiver-node]')).includes('timingSafeEqual'), 'the Node receiver is shown');
  check((await text('[data-test=receiver-python]')).includes('compare_digest'), 'the Python receiver is shown');
  await shot(page, '06-catalog');

  step('switching to Vietnamese');
  await page.selectOption('[data-test=language]', 'vi');
  await page.locator('h1', { hasText: 'Danh mục sự kiện' }).waitFor();
  check(await page.evaluate(() => document.documentElement.lang) === 'vi', 'the page language is vi');
  await page.click('nav >> text=Webhook của bạn');
  await card(id).locator('[data-test=endpoint-status]', { hasText: 'Đang hoạt động' }).waitFor();
  await shot(page, '07-webhooks-vi');
  await page.selectOption('[data-test=language]', 'en');

  step('a phone-width screen has no horizontal scrolling');
  await page.setViewportSize({ width: 390, height: 844 });
  await openEndpoint(id);
  check(await page.evaluate(() => document.documentElement.scrollWidth) <= 390, 'the endpoint page fits 390 px');
  await shot(page, '08-endpoint-phone');
  await page.setViewportSize({ width: 1280, height: 900 });

  step('deleting asks first; Escape keeps the endpoint');
  await page.click('[data-test=delete]');
  await page.keyboard.press('Escape');
  check(await page.locator('[data-test=send-test]').count() === 1, 'still on the endpoint page');
  await page.click('[data-test=delete]');
  await page.click('[data-test=confirm]');
  await page.locator('[data-test=empty]').waitFor();

  step('a browser set to Vietnamese opens in Vietnamese');
  const vi = await browser.newContext({ locale: 'vi-VN' });
  const viPage = await vi.newPage();
  await viPage.goto(`${BASE}/dashboard/`);
  await viPage.locator('h1', { hasText: 'Đăng nhập' }).waitFor();
  await vi.close();

  step('the Express and Python receiver examples verify real deliveries');
  await page.click('[data-test=sign-out]');
  await page.fill('#api-key', EXAMPLES_KEY);
  await page.keyboard.press('Enter');
  const examples = page.locator('[data-test=endpoint-card]');
  await examples.first().waitFor();
  const ids = await examples.evaluateAll((cards) => cards.map((c) => c.dataset.endpoint));
  check(ids.length === 2, `two example endpoints, found ${ids.length}`);
  for (const exampleId of ids) {
    await openEndpoint(exampleId);
    await sendTest('customer.created');
    await page.locator('[data-test=delivery-row][data-status=succeeded]').waitFor();
  }

  check(pageErrors.length === 0, `script errors: ${pageErrors.join('; ')}`);
  const foreign = requests.filter((u) => !u.startsWith(BASE) && !u.startsWith('data:'));
  check(foreign.length === 0, `requests left the producer: ${foreign.join(', ')}`);
  check(!requests.some((u) => u.includes(KEY) || u.includes(EXAMPLES_KEY)), 'no request URL carries a key');
  console.log(`dashboard: every step passed; screenshots in ${SHOTS}`);
} catch (e) {
  console.error(`dashboard step failed: ${current}\n${e.stack || e}`);
  if (pageErrors.length) console.error(`script errors in the page: ${pageErrors.join('; ')}`);
  await shot(page, 'failure').catch(() => {});
  process.exitCode = 1;
} finally {
  await browser.close();
}
