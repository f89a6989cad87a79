#!/usr/bin/env python3
"""A webhook receiver for the demo, written with nothing but Python's standard library, to show
that a receiver outside our code base verifies Laabam's Standard Webhooks signatures.

It answers 500 to the first attempt of every third event, so the demo shows retries too.
Usage: demo-receiver.py PORT SECRET
"""
import base64, hashlib, hmac, http.server, json, sys, time

port, secret = int(sys.argv[1]), sys.argv[2]
key = base64.b64decode(secret.removeprefix("whsec_"))
seen = {}

def verify(msg_id, ts, body, header):
    if abs(time.time() - int(ts)) > 300:
        return False
    expected = base64.b64encode(hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(sig.split(",", 1)[1], expected) for sig in header.split() if sig.startswith("v1,"))

class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        msg_id = self.headers["webhook-id"]
        ok = verify(msg_id, self.headers["webhook-timestamp"], body, self.headers["webhook-signature"])
        event = json.loads(body)
        n = seen[msg_id] = seen.get(msg_id, 0) + 1
        fail = ok and n == 1 and sum(map(ord, msg_id)) % 3 == 0
        status = 401 if not ok else 500 if fail else 200
        print(f"receiver: {event['type']:<17} {msg_id} attempt {self.headers['x-laabam-attempt']} "
              f"signature {'verified' if ok else 'INVALID'} -> {status}  data={json.dumps(event['data'])}", flush=True)
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b"ok" if status == 200 else b"try again")

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
