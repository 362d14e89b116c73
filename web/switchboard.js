/**
 * switchboard.js — a browser client for the Switchboard protocol (docs/protocol.md, §12 "Client library").
 *
 * One `SwitchboardClient` is one device: one WebSocket, reconnected with jittered exponential backoff, plus
 * the REST calls a chat client needs. It implements the protocol's recommended client algorithm (§10):
 *
 * - **Send with retry and dedupe.** `send()` records the message in an outbox *before* it is written to the
 *   socket (the outbox survives a reload when a `storage` is given), and resends every unanswered entry with
 *   the same `msg_id` after each reconnect, after 30 s without an answer, and after `rate_limited`,
 *   `store_unavailable` or `internal`. The server dedupes by `msg_id`, so a resend never doubles a message.
 * - **Sync.** `track(conv, lastSeq)` holds a conversation contiguous from `lastSeq`: `message` events come in
 *   seq order, with no gap and no repeat; a gap buffers what came early and `sync`s the hole. Every tracked
 *   conversation is synced from its last seq on each (re)connect, and again while `synced` says `has_more`.
 * - **Signals.** typing, delivered/read receipts and presence, passed through as events. An op the server does
 *   not know (`unknown_op`, e.g. `presence_subscribe` on an older server) or a REST route it does not have
 *   (404) is remembered as unsupported and never retried on that client: signals degrade silently.
 *
 * Events (all `CustomEvent`s; read `event.detail`):
 *
 * | event         | detail                                                                  |
 * |---------------|-------------------------------------------------------------------------|
 * | `state`       | `{state, attempt, retryInMs}`; state is `connecting`, `open`, `waiting`, `closed` or `unauthorized` |
 * | `message`     | `{message, tracked}`: a stored message (`conv, seq, id, msg_id, from, body, ts`). For a tracked conversation, in seq order and exactly once; for others, as it arrived live (`tracked: false`) |
 * | `ack`         | `{msgId, message}`: one of this client's sends is durable (also when a replay proved it)           |
 * | `sendfailed`  | `{msgId, conv, body, code, message}`: refused for good (`not_member`, `body_too_large`, …)         |
 * | `synced`      | `{conv, lastSeq}`: a tracked conversation is caught up                                  |
 * | `syncfailed`  | `{conv, code}`: a tracked conversation could not be synced (no longer a member); it is untracked     |
 * | `removed`     | `{conv, by}`: this user was removed from the group `conv` (or left from another device); it is untracked |
 * | `typing`      | `{conv, user}`                                                          |
 * | `receipt`     | `{conv, user, kind, seq}`: kind `delivered` or `read`; also from the user's own other devices       |
 * | `presence`    | `{user, state, last_seen}`                                              |
 * | `unsupported` | `{feature}`: the server does not offer it (`presence`)                  |
 * | `error`       | `{code, message}`: any other error frame                                 |
 *
 * No dependency, no build step: an ES module for browsers (WebSocket, fetch, EventTarget, crypto.randomUUID).
 */

/** Errors a `send` is resent after, with the same `msg_id`; any other code is final (protocol §7). */
const RETRYABLE = new Set(['rate_limited', 'store_unavailable', 'internal']);
/** Ops that a server may not know yet; `unknown_op` after one of them marks its feature unsupported. */
const OPTIONAL_OPS = { presence_subscribe: 'presence' };
/** Most users one `presence_subscribe` (or one `GET /v1/presence`) may name (protocol §1). */
const MAX_WATCHED = 1000;

/** A REST error: `status` is the HTTP status, `code` the protocol's error code (or `http_<status>`). */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || code);
    this.status = status;
    this.code = code;
  }
}

/** The `sub` claim of a JWT (the user id), or null. The token is not verified here: the server does that. */
export function tokenUser(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(part + '='.repeat((4 - (part.length % 4)) % 4))).sub || null;
  } catch {
    return null;
  }
}

/** Whether the server offers dev login (`POST /v1/dev/token`): a body it must refuse tells without minting. */
export async function devLoginAvailable(baseUrl = location.origin) {
  try {
    const r = await fetch(`${baseUrl}/v1/dev/token`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: '{"user":""}',
    });
    return r.status !== 404;
  } catch {
    return false;
  }
}

/** Mint a dev token for `user` (only where dev login is on): resolves to the JWT. */
export async function devToken(user, baseUrl = location.origin) {
  const r = await fetch(`${baseUrl}/v1/dev/token`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ user }),
  });
  const body = await r.json().catch(() => null);
  if (!r.ok) {
    throw new ApiError(r.status, body?.error?.code || `http_${r.status}`, body?.error?.message);
  }
  return body.token;
}

export class SwitchboardClient extends EventTarget {
  /**
   * @param {object} options
   * @param {string} options.token a JWT for the user (its `sub` is the user id)
   * @param {string} [options.baseUrl] the node's HTTP origin; default: the page's
   * @param {Storage} [options.storage] where the outbox survives reloads (sessionStorage: one per tab/device)
   * @param {number} [options.minBackoffMs] first reconnect delay, doubled per failed attempt (500)
   * @param {number} [options.maxBackoffMs] largest reconnect delay (30000)
   * @param {number} [options.pingEveryMs] heartbeat; the server closes a socket silent for 90 s (25000)
   * @param {number} [options.answerTimeoutMs] resend a send, re-issue a sync, after this long unanswered (30000)
   */
  constructor(options) {
    super();
    this.token = options.token;
    this.user = tokenUser(options.token);
    this.baseUrl = (options.baseUrl || location.origin).replace(/\/$/, '');
    this.storage = options.storage || null;
    this.minBackoffMs = options.minBackoffMs ?? 500;
    this.maxBackoffMs = options.maxBackoffMs ?? 30000;
    this.pingEveryMs = options.pingEveryMs ?? 25000;
    this.answerTimeoutMs = options.answerTimeoutMs ?? 30000;
    this.state = 'closed';
    this.attempt = 0;
    this.ws = null;
    this.timers = { retry: null, ping: null, watch: null };
    /** conv → {lastSeq, early: Map<seq, message>, syncSentAt, syncErrors} */
    this.tracked = new Map();
    /** msg_id → {conv, body, createdAt, sentAt, attempts, notBefore} */
    this.outbox = this.loadOutbox();
    /** The highest `read` per conversation, sent or waiting for a socket. */
    this.reads = new Map();
    this.typingSentAt = new Map();
    this.presenceUsers = new Set();
    /** Features the server has shown it does not offer. */
    this.unsupported = new Set();
    /** Optional ops written on the current socket (to attribute an `unknown_op`). */
    this.optionalSent = new Set();
    this.lastFrameAt = 0;
    this.stopped = true;
    this.onOnline = () => this.state === 'waiting' && this.openSocket();
  }

  // ---- connection -----------------------------------------------------------------------------------------

  /** Open the socket and keep it open (reconnecting with backoff) until `close()`. */
  connect() {
    this.stopped = false;
    globalThis.addEventListener?.('online', this.onOnline);
    this.openSocket();
  }

  /** Close the socket for good (pending sends stay in the outbox for the next `connect()`). */
  close() {
    this.stopped = true;
    globalThis.removeEventListener?.('online', this.onOnline);
    this.dropSocket();
    this.setState('closed');
  }

  /** Use a new token (e.g. after `unauthorized`) and reconnect with it. */
  setToken(token) {
    this.token = token;
    this.user = tokenUser(token);
    if (!this.stopped) {
      this.dropSocket();
      this.openSocket();
    }
  }

  setState(state, retryInMs = null) {
    this.state = state;
    this.emit('state', { state, attempt: this.attempt, retryInMs });
  }

  openSocket() {
    clearTimeout(this.timers.retry);
    this.dropSocket();
    const url = `${this.baseUrl.replace(/^http/, 'ws')}/v1/ws?token=${encodeURIComponent(this.token)}`;
    this.setState('connecting');
    const ws = new WebSocket(url);
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this.onOpen();
    };
    ws.onmessage = (e) => this.onFrame(e.data);
    ws.onclose = (e) => {
      if (this.ws === ws) this.onClosed(opened, e);
    };
  }

  /** Forget the current socket without waiting for its close handshake (a dead TCP can take minutes). */
  dropSocket() {
    clearInterval(this.timers.ping);
    clearInterval(this.timers.watch);
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      try {
        ws.close(1000);
      } catch {
        /* already closed */
      }
    }
  }

  onOpen() {
    this.attempt = 0;
    this.lastFrameAt = Date.now();
    this.optionalSent.clear();
    this.setState('open');
    // Protocol §10 step 3: resend unanswered sends first, then catch up on every tracked conversation.
    for (const msgId of this.outbox.keys()) this.transmit(msgId);
    for (const conv of this.tracked.keys()) this.syncFrom(conv);
    for (const [conv, seq] of this.reads) this.write({ op: 'read', conv, seq });
    this.sendPresenceSubscribe();
    this.timers.ping = setInterval(() => this.write({ op: 'ping' }), this.pingEveryMs);
    this.timers.watch = setInterval(() => this.watchdog(), 1000);
  }

  async onClosed(opened, e) {
    this.dropSocket();
    if (this.stopped) return;
    if (e?.code === 1013) {
      // The node admits handshakes at a bounded pace: come back when it says (its hint has jitter).
      let delay = 1000;
      try {
        delay = JSON.parse(e.reason).retry_after_ms ?? delay;
      } catch {
        /* no hint: a second */
      }
      this.setState('waiting', delay);
      this.timers.retry = setTimeout(() => this.openSocket(), delay);
      return;
    }
    // A socket refused before it opened may be a refused token: the upgrade's 401 is invisible to
    // scripts, so ask REST, which answers the same check with a status.
    if (!opened && (await this.tokenRefused())) {
      this.stopped = true;
      this.setState('unauthorized');
      return;
    }
    if (this.stopped || this.ws) return;
    this.attempt += 1;
    const ceiling = Math.min(this.maxBackoffMs, this.minBackoffMs * 2 ** (this.attempt - 1));
    // Equal jitter: at least half the ceiling, so a node's clients spread out rather than return at once.
    const delay = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
    this.setState('waiting', delay);
    this.timers.retry = setTimeout(() => this.openSocket(), delay);
  }

  async tokenRefused() {
    try {
      const r = await fetch(`${this.baseUrl}/v1/conversations`, {
        headers: { authorization: `Bearer ${this.token}` },
      });
      return r.status === 401;
    } catch {
      return false;
    }
  }

  /** Once a second: resend sends and re-issue syncs unanswered for too long; reconnect a silent socket. */
  watchdog() {
    const now = Date.now();
    if (now - this.lastFrameAt > this.pingEveryMs * 2 + 10000) {
      this.onClosed(true);
      return;
    }
    for (const [msgId, entry] of this.outbox) {
      const due = entry.sentAt === null ? now >= entry.notBefore : now - entry.sentAt > this.answerTimeoutMs;
      if (due) this.transmit(msgId);
    }
    for (const [conv, t] of this.tracked) {
      if (t.syncSentAt !== null && now - t.syncSentAt > this.answerTimeoutMs) this.syncFrom(conv);
    }
  }

  write(frame) {
    if (this.ws?.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  // ---- sending --------------------------------------------------------------------------------------------

  /**
   * Send `body` to `conv`. Returns the `msg_id` at once; the message is in the outbox until an `ack` (event
   * `ack`) or a final error (event `sendfailed`), and is resent with the same `msg_id` until then.
   */
  send(conv, body, msgId = crypto.randomUUID()) {
    this.outbox.set(msgId, { conv, body, createdAt: Date.now(), sentAt: null, attempts: 0, notBefore: 0 });
    this.saveOutbox();
    this.transmit(msgId);
    return msgId;
  }

  /** The sends not yet acknowledged, oldest first (optionally of one conversation). */
  pending(conv = null) {
    return [...this.outbox]
      .filter(([, e]) => conv === null || e.conv === conv)
      .map(([msgId, e]) => ({ msgId, conv: e.conv, body: e.body, createdAt: e.createdAt }));
  }

  transmit(msgId) {
    const e = this.outbox.get(msgId);
    if (!e || Date.now() < e.notBefore) return;
    if (this.write({ op: 'send', msg_id: msgId, conv: e.conv, body: e.body })) {
      e.sentAt = Date.now();
      e.attempts += 1;
    }
  }

  /** The send `msgId` is durable as `message`: leave the outbox and tell the listeners, once. */
  settle(msgId, message) {
    if (!this.outbox.delete(msgId)) return false;
    this.saveOutbox();
    this.emit('ack', { msgId, message });
    return true;
  }

  onSendError(f) {
    const e = this.outbox.get(f.msg_id);
    if (!e) return;
    if (RETRYABLE.has(f.code)) {
      const backoff = f.retry_after_ms ?? Math.min(this.maxBackoffMs, this.minBackoffMs * 2 ** e.attempts);
      e.sentAt = null;
      e.notBefore = Date.now() + backoff;
      return;
    }
    this.outbox.delete(f.msg_id);
    this.saveOutbox();
    this.emit('sendfailed', { msgId: f.msg_id, conv: e.conv, body: e.body, code: f.code, message: f.message });
  }

  outboxKey() {
    return `switchboard.outbox.${this.user}`;
  }

  loadOutbox() {
    try {
      const saved = JSON.parse(this.storage?.getItem(this.outboxKey()) || '[]');
      return new Map(saved.map(([id, e]) => [id, { ...e, sentAt: null, notBefore: 0 }]));
    } catch {
      return new Map();
    }
  }

  saveOutbox() {
    try {
      this.storage?.setItem(this.outboxKey(), JSON.stringify([...this.outbox]));
    } catch {
      /* storage full or unavailable: the outbox still lives in memory */
    }
  }

  // ---- receiving and syncing ------------------------------------------------------------------------------

  /** Hold `conv` contiguous from `lastSeq` (every message up to it is known): sync it now and on reconnects. */
  track(conv, lastSeq) {
    const t = this.tracked.get(conv);
    if (t) {
      if (lastSeq > t.lastSeq) t.lastSeq = lastSeq;
      return;
    }
    this.tracked.set(conv, { lastSeq, early: new Map(), syncSentAt: null, syncErrors: 0 });
    this.syncFrom(conv);
  }

  untrack(conv) {
    this.tracked.delete(conv);
  }

  /** The seq up to which every message of a tracked conversation has been emitted (null if untracked). */
  lastSeq(conv) {
    return this.tracked.get(conv)?.lastSeq ?? null;
  }

  syncFrom(conv) {
    const t = this.tracked.get(conv);
    if (t && this.write({ op: 'sync', conv, after_seq: t.lastSeq })) t.syncSentAt = Date.now();
  }

  onFrame(data) {
    this.lastFrameAt = Date.now();
    let f;
    try {
      f = JSON.parse(data);
    } catch {
      return;
    }
    switch (f.op) {
      case 'msg':
        this.receive(strip(f));
        break;
      case 'ack':
        this.onAck(f);
        break;
      case 'synced':
        this.onSynced(f);
        break;
      case 'error':
        this.onError(f);
        break;
      case 'typing':
        this.emit('typing', { conv: f.conv, user: f.user });
        break;
      case 'receipt':
        this.emit('receipt', { conv: f.conv, user: f.user, kind: f.kind, seq: f.seq });
        break;
      case 'presence':
        this.emit('presence', { user: f.user, state: f.state, last_seen: f.last_seen ?? null });
        break;
      case 'removed':
        this.tracked.delete(f.conv);
        this.emit('removed', { conv: f.conv, by: f.by ?? null });
        break;
      default:
        break; // pong, and frames newer than this client
    }
  }

  onAck(f) {
    const e = this.outbox.get(f.msg_id);
    const message = {
      conv: f.conv, seq: f.seq, id: f.id, msg_id: f.msg_id, from: this.user, body: e ? e.body : null, ts: f.ts,
    };
    this.settle(f.msg_id, message);
    // An ack for a send already settled by a replay carries no body; the replay delivered it.
    if (e) this.receive(message);
  }

  /** Apply a stored message by (conv, seq): protocol §10 step 4. */
  receive(m) {
    if (m.from === this.user && this.outbox.has(m.msg_id)) this.settle(m.msg_id, m);
    const t = this.tracked.get(m.conv);
    if (!t) {
      this.emit('message', { message: m, tracked: false });
      return;
    }
    if (m.seq <= t.lastSeq) return;
    if (m.seq > t.lastSeq + 1) {
      t.early.set(m.seq, m);
      if (t.syncSentAt === null) this.syncFrom(m.conv);
      return;
    }
    this.emitInOrder(t, m);
    for (let next = t.early.get(t.lastSeq + 1); next; next = t.early.get(t.lastSeq + 1)) {
      this.emitInOrder(t, next);
    }
    for (const seq of t.early.keys()) if (seq <= t.lastSeq) t.early.delete(seq);
  }

  emitInOrder(t, m) {
    t.lastSeq = m.seq;
    t.early.delete(m.seq);
    this.emit('message', { message: m, tracked: true });
  }

  onSynced(f) {
    const t = this.tracked.get(f.conv);
    if (!t) return;
    t.syncSentAt = null;
    t.syncErrors = 0;
    // Still short of what the server holds (more to come, or a gap the replay did not fill): go on.
    if (f.has_more || t.early.size > 0 || f.last_seq > t.lastSeq) {
      this.syncFrom(f.conv);
      return;
    }
    this.emit('synced', { conv: f.conv, lastSeq: t.lastSeq });
  }

  onError(f) {
    if (typeof f.msg_id === 'string') {
      this.onSendError(f);
      return;
    }
    if (f.code === 'unknown_op') {
      // Only optional ops can be unknown to a server that speaks this protocol at all.
      for (const op of this.optionalSent) this.markUnsupported(OPTIONAL_OPS[op]);
      this.optionalSent.clear();
      return;
    }
    if (typeof f.conv === 'string') {
      // A sync's error names its conversation (servers before it did not: see below).
      const t = this.tracked.get(f.conv);
      if (t) this.syncFailed(f.conv, t, f);
      return;
    }
    const syncing = [...this.tracked].filter(([, t]) => t.syncSentAt !== null);
    if (syncing.length > 0 && ['unknown_conversation', 'not_member', 'store_unavailable', 'internal'].includes(f.code)) {
      // An older server's sync error names no conversation: retry each outstanding one.
      for (const [conv, t] of syncing) this.syncFailed(conv, t, f);
      return;
    }
    this.emit('error', { code: f.code, message: f.message });
  }

  /** A sync of `conv` failed: try again after the server's hint or a backoff; one that keeps failing is dropped. */
  syncFailed(conv, t, f) {
    t.syncSentAt = null;
    if (f.code === 'rate_limited') {
      setTimeout(() => this.syncFrom(conv), f.retry_after_ms ?? 1000);
      return;
    }
    t.syncErrors += 1;
    if (t.syncErrors > 3) {
      this.tracked.delete(conv);
      this.emit('syncfailed', { conv, code: f.code });
    } else {
      setTimeout(() => this.syncFrom(conv), 500 * t.syncErrors);
    }
  }

  // ---- signals --------------------------------------------------------------------------------------------

  /** The user is typing in `conv`: sent at most once every 3 s per conversation. */
  typing(conv) {
    const now = Date.now();
    if (now - (this.typingSentAt.get(conv) || 0) < 3000) return;
    if (this.write({ op: 'typing', conv })) this.typingSentAt.set(conv, now);
  }

  /** This device has received `conv` up to `seq`. Best effort: not kept for a later socket. */
  delivered(conv, seq) {
    this.write({ op: 'delivered', conv, seq });
  }

  /** The user has seen `conv` up to `seq`. Moves the durable read position; kept and sent again on reconnect. */
  read(conv, seq) {
    if (seq <= (this.reads.get(conv) || 0)) return;
    this.reads.set(conv, seq);
    this.write({ op: 'read', conv, seq });
  }

  /** Ask for `presence` events about `users` (added to those asked before; sent again on reconnect). */
  subscribePresence(users) {
    const before = this.presenceUsers.size;
    for (const u of users) if (u !== this.user) this.presenceUsers.add(u);
    if (this.presenceUsers.size !== before) this.sendPresenceSubscribe();
  }

  sendPresenceSubscribe() {
    if (this.unsupported.has('presence') || this.presenceUsers.size === 0) return;
    const users = [...this.presenceUsers].slice(0, MAX_WATCHED);
    if (this.write({ op: 'presence_subscribe', users })) {
      this.optionalSent.add('presence_subscribe');
    }
  }

  markUnsupported(feature) {
    if (!feature || this.unsupported.has(feature)) return;
    this.unsupported.add(feature);
    this.emit('unsupported', { feature });
  }

  // ---- REST -----------------------------------------------------------------------------------------------

  /** A JSON REST call with the client's token. Throws `ApiError` on any non-2xx answer. */
  async api(method, path, body) {
    const headers = { authorization: `Bearer ${this.token}` };
    if (body !== undefined) headers['content-type'] = 'application/json';
    const r = await fetch(`${this.baseUrl}${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await r.text();
    let json = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch {
      /* not JSON: a plain 404 */
    }
    if (!r.ok) throw new ApiError(r.status, json?.error?.code || `http_${r.status}`, json?.error?.message);
    return json;
  }

  /** The inbox: conversations newest first, each with `last_seq`, `last_message`, `read_seq` and `unread`. */
  async conversations() {
    return (await this.api('GET', '/v1/conversations')).conversations;
  }

  /** One conversation, with its `members`. */
  conversation(conv) {
    return this.api('GET', `/v1/conversations/${encodeURIComponent(conv)}`);
  }

  /** Create a conversation: `{kind: 'dm', members: ['bob']}` or `{kind: 'group', name, members}`. */
  createConversation(spec) {
    return this.api('POST', '/v1/conversations', spec);
  }

  /** A history page, ascending seqs: `{messages, has_more}`. Without cursor, the newest `limit`. */
  history(conv, { before, after, limit = 50 } = {}) {
    const q = new URLSearchParams({ limit: String(limit) });
    if (before !== undefined) q.set('before', String(before));
    if (after !== undefined) q.set('after', String(after));
    return this.api('GET', `/v1/conversations/${encodeURIComponent(conv)}/messages?${q}`);
  }

  /** Presence of `users` (`[{user, state, last_seen}]`), or null when the server has no presence. */
  async presence(users) {
    if (this.unsupported.has('presence') || users.length === 0) return null;
    try {
      const list = users.slice(0, MAX_WATCHED).map(encodeURIComponent).join(',');
      const r = await this.api('GET', `/v1/presence?users=${list}`);
      return r.users;
    } catch (e) {
      if (e.status === 404) this.markUnsupported('presence');
      return null;
    }
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

function strip(f) {
  return { conv: f.conv, seq: f.seq, id: f.id, msg_id: f.msg_id, from: f.from, body: f.body, ts: f.ts };
}
