// Backoff, duplicate filter and the small helpers, without a network.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Backoff } from "../src/backoff.js";
import { DedupFilter } from "../src/dedup.js";
import { normalizeTopic, redirectUrl, userFromToken, PushgridClient } from "../src/client.js";
import { InvalidArgumentError } from "../src/errors.js";

test("backoff doubles from min to max with equal jitter", () => {
  let random = 0;
  const backoff = new Backoff(100, 1000, () => random);
  assert.deepEqual([1, 2, 3, 4, 5].map(() => backoff.nextDelayMs()), [50, 100, 200, 400, 500]);
  random = 1;
  backoff.reset();
  assert.deepEqual([1, 2, 3, 4, 5].map(() => backoff.nextDelayMs()), [100, 200, 400, 800, 1000]);
  const spread = new Backoff(1000, 1000);
  const delays = new Set(Array.from({ length: 50 }, () => spread.nextDelayMs()));
  assert.ok(delays.size > 10, "jittered: many different delays");
  for (const delay of delays) assert.ok(delay >= 500 && delay <= 1000);
});

test("the duplicate filter tells new, unacked and acked ids, and forgets the oldest", () => {
  const filter = new DedupFilter(3);
  assert.equal(filter.check(1n), "new");
  filter.insert(1n);
  assert.equal(filter.check(1n), "duplicate_unacked");
  filter.markAcked(1n);
  assert.equal(filter.check(1n), "duplicate_acked");
  filter.insert(2n);
  filter.insert(3n);
  filter.insert(4n);
  assert.equal(filter.size, 3);
  assert.equal(filter.check(1n), "new", "the oldest was forgotten");
  assert.equal(filter.check(4n), "duplicate_unacked");
  filter.forget(4n);
  assert.equal(filter.check(4n), "new");
});

test("topics follow the server's rule", () => {
  assert.equal(normalizeTopic(""), "all");
  assert.equal(normalizeTopic("news"), "news");
  assert.throws(() => normalizeTopic("x".repeat(129)), InvalidArgumentError);
  assert.throws(() => normalizeTopic("a\nb"), InvalidArgumentError);
});

test("a KICK's reconnect_to becomes a WebSocket url on the current scheme", () => {
  assert.equal(redirectUrl("10.0.0.2:8091", "ws://10.0.0.1:8091/"), "ws://10.0.0.2:8091/");
  assert.equal(redirectUrl("push2.example:443", "wss://push.example/"), "wss://push2.example:443/");
  assert.equal(redirectUrl("wss://other.example/push", "ws://a/"), "wss://other.example/push");
  assert.equal(redirectUrl("tcp://10.0.0.2:8090", "ws://a/"), undefined);
  assert.equal(redirectUrl("", "ws://a/"), undefined);
});

test("the user id comes from the token's sub claim", () => {
  const payload = Buffer.from(JSON.stringify({ sub: "alice", app: "demo" })).toString("base64url");
  assert.equal(userFromToken(`h.${payload}.s`), "alice");
  assert.equal(userFromToken("not a jwt"), undefined);
});

test("bad options are refused with InvalidArgumentError", () => {
  const WebSocket = class {} as never;
  assert.throws(() => new PushgridClient({ token: "", deviceId: "d", urls: ["ws://x/"], WebSocket }), InvalidArgumentError);
  assert.throws(() => new PushgridClient({ token: "t", deviceId: "d", WebSocket }), InvalidArgumentError);
  assert.throws(() => new PushgridClient({ token: "t", deviceId: "d", urls: ["http://x/"], WebSocket }), (error: unknown) => {
    return error instanceof InvalidArgumentError && error.code === "invalid_argument";
  });
});
