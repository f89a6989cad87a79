// A Laabam webhook receiver in Node.js with Express that verifies Standard Webhooks signatures.
//   npm install express
//   WEBHOOK_SECRET=whsec_... node receiver.js 3000   (then register http://your-host:3000/webhooks)
const crypto = require('node:crypto');
const express = require('express');

const secret = Buffer.from(process.env.WEBHOOK_SECRET.replace(/^whsec_/, ''), 'base64');
const TOLERANCE_SECONDS = 5 * 60;

function verify(req) {
  const id = req.get('webhook-id');
  const timestamp = req.get('webhook-timestamp');
  const signatures = req.get('webhook-signature');
  if (!id || !/^\d+$/.test(timestamp || '') || !signatures) return false;
  // Refuse old or future timestamps so a captured request cannot be replayed later.
  if (Math.abs(Date.now() / 1000 - Number(timestamp)) > TOLERANCE_SECONDS) return false;
  // Sign the raw bytes exactly as received: re-serialized JSON would not match.
  const expected = crypto.createHmac('sha256', secret).update(`${id}.${timestamp}.`).update(req.body).digest();
  // During a secret rotation the header carries several signatures; one valid is enough.
  return signatures.split(' ').some((entry) => {
    if (!entry.startsWith('v1,')) return false;
    const given = Buffer.from(entry.slice(3), 'base64');
    return given.length === expected.length && crypto.timingSafeEqual(given, expected);
  });
}

const app = express();
app.post('/webhooks', express.raw({ type: '*/*', limit: '1mb' }), (req, res) => {
  if (!Buffer.isBuffer(req.body) || !verify(req)) return res.status(401).send('invalid signature');
  const event = JSON.parse(req.body);
  // webhook-id is the same on every retry of a delivery: use it to process each event once.
  console.log(`received ${event.type} ${req.get('webhook-id')}`);
  res.sendStatus(204);
});
app.listen(Number(process.argv[2] || 3000), '127.0.0.1');
