// Publishes events to Laabam with Node's amqplib, as any Node service could, with no Laabam
// code: the durable topic exchange `laabam.events`, routing key = event type, body = the
// envelope as JSON, persistent, `messageId` = the event id (absent when the event has none),
// publisher confirms. Reads one envelope per line on stdin; the AMQP URL is the first argument.
//
// Run by tests/tests/delivery.rs with NODE_PATH=tests/browser/node_modules.
const amqp = require('amqplib');

async function main() {
  let input = '';
  for await (const chunk of process.stdin) input += chunk;
  const connection = await amqp.connect(process.argv[2]);
  const ch = await connection.createConfirmChannel();
  for (const line of input.split('\n').filter(Boolean)) {
    const event = JSON.parse(line);
    ch.publish('laabam.events', event.type, Buffer.from(JSON.stringify(event)), {
      persistent: true,
      messageId: event.id,
      contentType: 'application/json',
    });
  }
  // Rejects if the broker refused any of them: the test then fails on the exit status.
  await ch.waitForConfirms();
  await connection.close();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
