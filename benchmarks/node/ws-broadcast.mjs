// Baseline broadcast server for benchmarks/run.py: the simplest fast thing in Node.
//   WS   GET  /sub/<room>  joins <room>
//   HTTP POST /pub/<room>  sends the request body as one text frame to every socket in <room>
// Listens on 127.0.0.1, port from argv[2] (default 0 = any free port) and prints the port on stdout.
import http from 'node:http';
import { WebSocketServer } from 'ws';

const rooms = new Map(); // room name -> Set of sockets
const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });

const server = http.createServer((req, res) => {
  const match = /^\/pub\/(\w+)$/.exec(req.url);
  if (req.method !== 'POST' || !match) {
    res.writeHead(404, { 'Content-Length': 0 }).end();
    return;
  }
  const chunks = [];
  req.on('data', (chunk) => chunks.push(chunk));
  req.on('end', () => {
    // One Buffer for all sends, sent as a text frame: no per-socket re-encoding.
    const body = Buffer.concat(chunks);
    const room = rooms.get(match[1]);
    if (room) for (const c of room) c.send(body, { binary: false });
    res.writeHead(200, { 'Content-Length': 0 }).end();
  });
});
// The load generator opens its publisher connections before a phase; keep them across idle gaps.
server.keepAliveTimeout = 120_000;

server.on('upgrade', (req, socket, head) => {
  const match = /^\/sub\/(\w+)$/.exec(req.url);
  if (!match) {
    socket.destroy();
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    const name = match[1];
    let room = rooms.get(name);
    if (!room) rooms.set(name, (room = new Set()));
    room.add(ws);
    ws.on('close', () => {
      room.delete(ws);
      if (room.size === 0 && rooms.get(name) === room) rooms.delete(name);
    });
  });
});

server.listen(Number(process.argv[2] || 0), '127.0.0.1', 4096, () => {
  console.log(server.address().port);
});
process.on('SIGTERM', () => process.exit(0));
