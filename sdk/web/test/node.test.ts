// The SDK in Node (WebSocket from the `ws` package) against two scripted
// rooms speaking the frame protocol: heartbeats, ACK after the handler,
// UPSTREAM answered by seq, SUB_OK positions, a KICK whose bare reconnect_to
// sends the client to the other room, the SUB resent there from the last
// offset, and a redelivered acked message acked again but not shown again.
import { test } from "node:test";
import assert from "node:assert/strict";
import { create } from "@bufbuild/protobuf";
import { WebSocketServer, WebSocket, type RawData } from "ws";
import * as pb from "../src/gen/client_pb.js";
import { FrameDecoder, Op, decodeBody, encodeEmpty, encodeFrame, type Frame } from "../src/frame.js";
import { PushgridClient, type PushMessage, type WebSocketConstructor } from "../src/client.js";
import { KickedError } from "../src/errors.js";

interface Room {
  server: WebSocketServer;
  port: number;
  frames: Frame[];
  send: (frame: Uint8Array) => void;
  next: (op: Op) => Promise<Frame>;
}

async function room(onAuth: (room: Room) => void): Promise<Room> {
  const server = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise<void>((resolve) => server.once("listening", () => resolve()));
  const waiters: Array<{ op: Op; resolve: (frame: Frame) => void }> = [];
  let socket: WebSocket | undefined;
  const state: Room = {
    server,
    port: (server.address() as { port: number }).port,
    frames: [],
    send: (frame) => socket?.send(frame),
    next: (op) =>
      new Promise((resolve) => {
        const seen = state.frames.find((frame) => frame.op === op);
        if (seen) {
          state.frames.splice(state.frames.indexOf(seen), 1);
          return resolve(seen);
        }
        waiters.push({ op, resolve });
      }),
  };
  server.on("connection", (ws) => {
    socket = ws;
    const decoder = new FrameDecoder();
    ws.on("message", (data: RawData) => {
      for (const frame of decoder.push(new Uint8Array(data as Buffer))) {
        if (frame.op === Op.Auth) {
          const auth = decodeBody(pb.AuthSchema, frame);
          assert.equal(auth.platform, "node");
          state.send(encodeFrame(Op.AuthOk, frame.seq, pb.AuthOkSchema, create(pb.AuthOkSchema, { connId: 1n, heartbeatSecs: 1 })));
          onAuth(state);
          continue;
        }
        if (frame.op === Op.Ping) state.send(encodeEmpty(Op.Pong, frame.seq));
        const waiter = waiters.find((w) => w.op === frame.op);
        if (waiter) {
          waiters.splice(waiters.indexOf(waiter), 1);
          waiter.resolve(frame);
        } else {
          state.frames.push(frame);
        }
      }
    });
  });
  return state;
}

const push = (msgId: bigint, extra: { kind?: pb.PushKind; topic?: string; offset?: bigint; epoch?: bigint } = {}) =>
  encodeFrame(Op.Push, 0, pb.PushSchema, create(pb.PushSchema, { msgId, payload: new TextEncoder().encode(`m${msgId}`), ...extra }));

test("in Node: ACK after the handler, upstream, a KICK's reconnect_to, topics resumed from their offset", async () => {
  const second = await room(() => undefined);
  const first = await room(() => undefined);
  const client = new PushgridClient({
    token: "t",
    deviceId: "node-1",
    platform: "node",
    urls: [`ws://127.0.0.1:${first.port}/`],
    WebSocket: WebSocket as unknown as WebSocketConstructor,
    reconnectBackoffMinMs: 50,
  });
  const messages: PushMessage[] = [];
  const handled: string[] = [];
  client.on("message", async (message) => {
    messages.push(message);
    await new Promise((resolve) => setTimeout(resolve, 20));
    handled.push(message.text);
  });
  const kicks: KickedError[] = [];
  client.on("kicked", (kick) => kicks.push(kick));
  await client.connect();

  // A push is acked only once its handler finished.
  first.send(push(7n));
  const ack = decodeBody(pb.AckSchema, await first.next(Op.Ack));
  assert.deepEqual(ack.msgIds, [7n]);
  assert.deepEqual(handled, ["m7"], "the ACK came after the handler returned");

  // Upstream: answered by the seq of its frame.
  const sent = client.upstream("chat", "text", "hi", "c-1");
  const upstream = await first.next(Op.Upstream);
  assert.equal(decodeBody(pb.UpstreamSchema, upstream).clientMsgId, "c-1");
  first.send(encodeFrame(Op.UpstreamOk, upstream.seq, pb.UpstreamOkSchema, create(pb.UpstreamOkSchema, { clientMsgId: "c-1" })));
  await sent;

  // A topic: SUB_OK, then a broadcast moves its position.
  const subscribed = client.subscribe("news");
  const sub = decodeBody(pb.SubSchema, await first.next(Op.Sub));
  assert.deepEqual([sub.topic, sub.sinceOffset, sub.epoch], ["news", 0n, 0n]);
  first.send(encodeFrame(Op.SubOk, 0, pb.SubOkSchema, create(pb.SubOkSchema, { topic: "news", offset: 5n, epoch: 9n })));
  assert.equal((await subscribed).offset, 5n);
  first.send(push(100n, { kind: pb.PushKind.BROADCAST, topic: "news", offset: 6n, epoch: 9n }));

  // Heartbeats at the server's interval (1 s).
  await first.next(Op.Ping);

  // KICK to the other room by a bare address: the client goes there.
  await new Promise((resolve) => setTimeout(resolve, 50));
  first.send(
    encodeFrame(Op.Kick, 0, pb.KickSchema, create(pb.KickSchema, {
      code: pb.KickCode.SHUTDOWN,
      reason: "draining",
      reconnectAfterMs: 10,
      reconnectTo: `127.0.0.1:${second.port}`,
    })),
  );
  const resub = decodeBody(pb.SubSchema, await second.next(Op.Sub));
  assert.deepEqual([resub.topic, resub.sinceOffset, resub.epoch], ["news", 6n, 9n], "resubscribed from the last offset");
  assert.equal(kicks.length, 1);
  assert.equal(kicks[0]!.kickCode, pb.KickCode.SHUTDOWN);
  assert.equal(kicks[0]!.code, "kicked");

  // The acked message comes again (its ACK was "lost"): acked again, not shown again.
  second.send(push(7n));
  second.send(push(8n));
  const reack = decodeBody(pb.AckSchema, await second.next(Op.Ack));
  assert.deepEqual(reack.msgIds, [7n]);
  const next = decodeBody(pb.AckSchema, await second.next(Op.Ack));
  assert.deepEqual(next.msgIds, [8n]);
  assert.deepEqual(messages.map((m) => m.text), ["m7", "m100", "m8"]);
  assert.equal(client.stats().duplicatesDropped, 1);

  client.close();
  first.server.close();
  second.server.close();
});

test("in Node: a topic seen empty is replayed from the start of its epoch after a reconnect", { timeout: 15_000 }, async () => {
  const second = await room(() => undefined);
  const first = await room(() => undefined);
  const client = new PushgridClient({
    token: "t",
    deviceId: "node-2",
    platform: "node",
    urls: [`ws://127.0.0.1:${first.port}/`],
    WebSocket: WebSocket as unknown as WebSocketConstructor,
    reconnectBackoffMinMs: 50,
  });
  const messages: PushMessage[] = [];
  client.on("message", (message) => {
    messages.push(message);
  });
  await client.connect();

  // Nothing published yet: the stream has no epoch.
  const subscribed = client.subscribe("quiet");
  await first.next(Op.Sub);
  first.send(encodeFrame(Op.SubOk, 0, pb.SubOkSchema, create(pb.SubOkSchema, { topic: "quiet", recovered: true })));
  assert.equal((await subscribed).epoch, 0n);

  // Offsets 1 to 2 of epoch 4 are published while the device moves rooms.
  first.send(encodeFrame(Op.Kick, 0, pb.KickSchema, create(pb.KickSchema, {
    code: pb.KickCode.SHUTDOWN, reconnectAfterMs: 10, reconnectTo: `127.0.0.1:${second.port}`,
  })));
  const resub = decodeBody(pb.SubSchema, await second.next(Op.Sub));
  assert.deepEqual([resub.sinceOffset, resub.epoch], [0n, 0n]);
  const events: boolean[] = [];
  client.on("subscribed", (event) => events.push(event.missed));
  second.send(encodeFrame(Op.SubOk, 0, pb.SubOkSchema, create(pb.SubOkSchema, { topic: "quiet", recovered: true, offset: 2n, epoch: 4n })));
  const again = decodeBody(pb.SubSchema, await second.next(Op.Sub));
  assert.deepEqual([again.topic, again.sinceOffset, again.epoch], ["quiet", 0n, 4n], "asked again from the start of epoch 4");
  second.send(push(41n, { kind: pb.PushKind.BROADCAST, topic: "quiet", offset: 1n, epoch: 4n }));
  second.send(push(42n, { kind: pb.PushKind.BROADCAST, topic: "quiet", offset: 2n, epoch: 4n }));
  second.send(encodeFrame(Op.SubOk, 0, pb.SubOkSchema, create(pb.SubOkSchema, { topic: "quiet", recovered: true, offset: 2n, epoch: 4n })));
  const deadline = Date.now() + 5000;
  while ((events.length === 0 || messages.length < 2) && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  assert.deepEqual(messages.map((m) => m.text), ["m41", "m42"]);
  assert.deepEqual(events, [false], "one subscribed event, nothing missed");

  client.close();
  first.server.close();
  second.server.close();
});
