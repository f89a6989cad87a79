"""Publishes events to Laabam the way the README's pika example does, with no Laabam code:
the durable topic exchange `laabam.events`, routing key = event type, body = the envelope as
JSON, persistent, `message_id` = the event id (absent when the event has none), publisher
confirms. Reads one envelope per line on stdin; the AMQP URL is the first argument.

Run by tests/tests/delivery.rs with Debian's python3-pika (`/usr/bin/python3`)."""
import json
import sys

import pika

connection = pika.BlockingConnection(pika.URLParameters(sys.argv[1]))
ch = connection.channel()
ch.confirm_delivery()
for line in sys.stdin:
    event = json.loads(line)
    # Raises if the broker does not confirm: the test then fails on the exit status.
    ch.basic_publish("laabam.events", event["type"], json.dumps(event),
                     pika.BasicProperties(delivery_mode=2, message_id=event.get("id"),
                                          content_type="application/json"))
connection.close()
