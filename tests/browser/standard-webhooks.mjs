// Verifies deliveries with the Standard Webhooks reference library for TypeScript (npm
// `standardwebhooks`, by the specification's authors), as a receiver using it would: reads a
// JSON array of {secret, body, headers} on stdin and prints a JSON array holding, for each,
// "ok" or the library's reason for refusing it. Run by tests/tests/delivery.rs.
import { Webhook } from 'standardwebhooks';

let input = '';
for await (const chunk of process.stdin) input += chunk;
const verdicts = JSON.parse(input).map(({ secret, body, headers }) => {
  try {
    new Webhook(secret).verify(body, headers);
    return 'ok';
  } catch (e) {
    return `${e.name}: ${e.message}`;
  }
});
process.stdout.write(JSON.stringify(verdicts));
