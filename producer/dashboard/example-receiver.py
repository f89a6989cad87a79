"""A Laabam webhook receiver in Python (standard library only) that verifies Standard Webhooks
signatures.
    WEBHOOK_SECRET=whsec_... python3 receiver.py 3000
"""
import base64, hashlib, hmac, json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = base64.b64decode(os.environ["WEBHOOK_SECRET"].removeprefix("whsec_"))
TOLERANCE_SECONDS = 5 * 60


def verify(headers, body):
    msg_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp") or ""
    signatures = headers.get("webhook-signature")
    if not msg_id or not timestamp.isdigit() or not signatures:
        return False
    # Refuse old or future timestamps so a captured request cannot be replayed later.
    if abs(time.time() - int(timestamp)) > TOLERANCE_SECONDS:
        return False
    # Sign the raw bytes exactly as received: re-serialized JSON would not match.
    mac = hmac.new(SECRET, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    expected = base64.b64encode(mac.digest()).decode()
    # During a secret rotation the header carries several signatures; one valid is enough.
    return any(hmac.compare_digest(entry[3:], expected)
               for entry in signatures.split(" ") if entry.startswith("v1,"))


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if not verify(self.headers, body):
            self.send_response(401)
            self.end_headers()
            return
        event = json.loads(body)
        # webhook-id is the same on every retry of a delivery: use it to process each event once.
        print("received", event["type"], self.headers["webhook-id"], flush=True)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1] if len(sys.argv) > 1 else 3000)), Receiver).serve_forever()
