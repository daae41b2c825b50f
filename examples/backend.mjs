// A backend for push-service in Node 18+, with no dependency: it signs client tokens (HS256 JWTs, with
// node:crypto) and publishes messages (with fetch). Your real backend does the same after saving the
// message in its own database.
//
//   PUSH_URL=http://127.0.0.1:4000 PUSH_SERVICE_KEY=... PUSH_JWT_SECRET=... \
//     node examples/backend.mjs token ada Ada          # prints a client token for user "ada"
//     node examples/backend.mjs publish 7 "hello"      # publishes to thread 7 (room:topic:7)
import { createHmac } from "node:crypto";
import { pathToFileURL } from "node:url";

const PUSH_URL = process.env.PUSH_URL || "http://127.0.0.1:4000";
const SERVICE_KEY = process.env.PUSH_SERVICE_KEY;
const JWT_SECRET = process.env.PUSH_JWT_SECRET;

const base64url = (data) => Buffer.from(data).toString("base64url");

// A client token: who the user is (`sub`), until when (`exp`), which topics it may join, and what
// presence shows about it (`info`).
export function clientToken(sub, { username = sub, topics = ["room:topic:*"], ttlSeconds = 3600 } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const header = base64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const claims = base64url(JSON.stringify({ sub, iat: now, exp: now + ttlSeconds, topics, info: { username } }));
  const signature = createHmac("sha256", JWT_SECRET).update(`${header}.${claims}`).digest("base64url");
  return `${header}.${claims}.${signature}`;
}

// Broadcasts `new_msg` with `body` on room:topic:<thread_id>; the answer says how many local subscribers got it.
export async function publishToThread(threadId, body) {
  const response = await fetch(`${PUSH_URL}/api/thread`, {
    method: "POST",
    headers: { Authorization: `Bearer ${SERVICE_KEY}`, "Content-Type": "application/json" },
    body: JSON.stringify({ thread_id: threadId, ...body }),
  });
  const answer = await response.json();
  if (!response.ok) throw new Error(`publish refused: HTTP ${response.status} ${answer.error}`);
  return answer;  // {"status": 200, "published": 1, "delivered": N}
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  const [command, ...args] = process.argv.slice(2);
  if (!SERVICE_KEY || !JWT_SECRET) {
    console.error("set PUSH_SERVICE_KEY and PUSH_JWT_SECRET (push-service serve prints them in development)");
    process.exit(2);
  }
  if (command === "token" && args.length >= 1) {
    console.log(clientToken(args[0], { username: args[1] || args[0] }));
  } else if (command === "publish" && args.length === 2) {
    console.log(JSON.stringify(await publishToThread(args[0], { author: "backend", text: args[1] })));
  } else {
    console.error("usage: node backend.mjs token <user id> [username] | publish <thread id> <text>");
    process.exit(2);
  }
}
