// The chat page: sign-in, the inbox, one conversation's messages and the composer. Every protocol matter
// (socket, retries, sync, dedupe) is in switchboard.js; this file only keeps what is on screen in step with
// the client's events. Each tab is a device of its user: the token is shared by the tabs (localStorage), the
// unsent messages are the tab's own (sessionStorage).
import { SwitchboardClient, devLoginAvailable, devToken, tokenUser } from './switchboard.js';

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'switchboard.token';
/** The dev-login user name when the token came from dev login: a refused token is then minted again. */
const DEV_USER_KEY = 'switchboard.dev_user';
const PAGE = 50;
const MAX_BODY_BYTES = 4096;

let client = null;
let me = null;
/** conv id → inbox entry (the REST conversation object, with `read_seq` and `unread`). */
let inbox = new Map();
/** conv id → {messages: Map<seq, message>, oldest, hasOlder, loadingOlder} for conversations opened here. */
let views = new Map();
/** conv id → sorted member list (from GET /v1/conversations/{id}). */
let members = new Map();
/** conv id → Map<user, {delivered, read}>: other members' receipts seen by this tab. */
let receipts = new Map();
/** conv id → Map<user, time until which "typing" shows>. */
let typing = new Map();
/** user → {state, last_seen}; shown only while the server offers presence. */
let presence = new Map();
let presenceOn = true;
let current = null;
let deliveredDue = new Map();
let deliveredTimer = null;
let fetching = new Set();

// ---- sign-in ------------------------------------------------------------------------------------------------

async function start() {
  const token = localStorage.getItem(TOKEN_KEY);
  if (token && tokenUser(token)) signIn(token);
  else showSignIn('');
  window.addEventListener('storage', (e) => {
    // Another tab signed in or out: follow it (the tabs share one identity).
    if (e.key === TOKEN_KEY && e.newValue !== (client && client.token)) location.reload();
  });
}

async function showSignIn(why) {
  $('chat').hidden = true;
  $('signin').hidden = false;
  $('signout').hidden = true;
  $('me').hidden = true;
  setConn('closed', 'Signed out');
  $('signin-error').textContent = why;
  // The node says whether it offers dev login; a page from elsewhere asks it.
  const said = document.querySelector('meta[name="switchboard-dev-login"]')?.content;
  $('dev-form').hidden = !(said === 'on' || (said !== 'off' && (await devLoginAvailable())));
  ($('dev-form').hidden ? $('jwt') : $('dev-user')).focus();
}

$('dev-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const user = $('dev-user').value.trim();
  try {
    const token = await devToken(user);
    localStorage.setItem(DEV_USER_KEY, user);
    localStorage.setItem(TOKEN_KEY, token);
    signIn(token);
  } catch (err) {
    $('signin-error').textContent = `Dev login refused: ${err.message}`;
  }
});

$('jwt-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const token = $('jwt').value.trim();
  if (!tokenUser(token)) {
    $('signin-error').textContent = 'That is not a JWT with a user (sub claim).';
    return;
  }
  const probe = new SwitchboardClient({ token });
  try {
    await probe.conversations();
  } catch (err) {
    $('signin-error').textContent = err.status === 401 ? 'The server refused that token.' : `Sign-in failed: ${err.message}`;
    return;
  }
  localStorage.removeItem(DEV_USER_KEY);
  localStorage.setItem(TOKEN_KEY, token);
  signIn(token);
});

$('signout').addEventListener('click', () => {
  localStorage.removeItem(TOKEN_KEY);
  localStorage.removeItem(DEV_USER_KEY);
  if (client) sessionStorage.removeItem(client.outboxKey());
  // What this browser learnt of the user's conversations goes with the user.
  Object.keys(localStorage)
    .filter((k) => k.startsWith('switchboard.members.'))
    .forEach((k) => localStorage.removeItem(k));
  reset();
  showSignIn('');
});

function reset() {
  client?.close();
  client = null;
  me = null;
  inbox = new Map();
  views = new Map();
  members = new Map();
  receipts = new Map();
  typing = new Map();
  presence = new Map();
  deliveredDue = new Map();
  fetching = new Set();
  presenceOn = true;
  current = null;
  $('conv-list').replaceChildren();
  $('messages').replaceChildren();
}

function signIn(token) {
  reset();
  me = tokenUser(token);
  $('signin').hidden = true;
  $('chat').hidden = false;
  $('me').hidden = false;
  $('me').textContent = me;
  $('signout').hidden = false;
  client = new SwitchboardClient({ token, storage: sessionStorage });
  const on = (type, f) => client.addEventListener(type, (e) => f(e.detail));
  on('state', onState);
  on('message', ({ message, tracked }) => onMessage(message, tracked));
  on('ack', ({ msgId, message }) => onAck(msgId, message));
  on('sendfailed', onSendFailed);
  on('typing', onTyping);
  on('receipt', onReceipt);
  on('presence', (p) => {
    presence.set(p.user, p);
    renderPresence();
  });
  on('unsupported', ({ feature }) => {
    if (feature === 'presence') {
      presenceOn = false;
      renderPresence();
    }
  });
  on('removed', ({ conv, by }) => {
    inbox.delete(conv);
    if (conv === current) notice(by === me ? 'You left this group.' : `${by ?? 'The server'} removed you from this group.`);
    renderInbox();
  });
  on('syncfailed', ({ conv }) => {
    if (conv === current) notice('This conversation is no longer available to you.');
  });
  client.connect();
  refreshInbox();
}

// ---- connection state ---------------------------------------------------------------------------------------

let countdown = null;

function setConn(state, text) {
  const el = $('conn');
  el.dataset.state = state;
  el.textContent = text;
}

async function onState({ state, retryInMs }) {
  clearInterval(countdown);
  if (state === 'open') {
    setConn('open', 'Connected');
    refreshInbox();
  } else if (state === 'connecting') {
    setConn('connecting', 'Connecting…');
  } else if (state === 'waiting') {
    const at = Date.now() + retryInMs;
    const tick = () => setConn('waiting', `Offline, retrying in ${Math.max(0, Math.ceil((at - Date.now()) / 1000))} s`);
    tick();
    countdown = setInterval(tick, 1000);
  } else if (state === 'unauthorized') {
    const devUser = localStorage.getItem(DEV_USER_KEY);
    if (devUser === me) {
      // A dev token expired (or the node's secret changed): mint another and go on as the same device.
      try {
        const token = await devToken(me);
        localStorage.setItem(TOKEN_KEY, token);
        client.setToken(token);
        client.connect();
        return;
      } catch {
        /* fall through to the sign-in page */
      }
    }
    localStorage.removeItem(TOKEN_KEY);
    reset();
    showSignIn('Your token was refused; sign in again.');
  }
}

let noticeTimer = null;
function notice(text) {
  $('notice').textContent = text;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => ($('notice').textContent = ''), 8000);
}

// ---- the inbox ----------------------------------------------------------------------------------------------

async function refreshInbox() {
  const c = client;
  let list;
  try {
    list = await c.conversations();
  } catch (err) {
    if (err.status === 401 && c === client) onState({ state: 'unauthorized' });
    return;
  }
  if (c !== client) return;
  const next = new Map();
  for (const entry of list) {
    const old = inbox.get(entry.id);
    if (old && old.last_seq > entry.last_seq) {
      entry.last_seq = old.last_seq;
      entry.last_message = old.last_message;
    }
    if (old) entry.read_seq = Math.max(entry.read_seq, old.read_seq);
    entry.unread = Math.max(0, entry.last_seq - entry.read_seq);
    next.set(entry.id, entry);
  }
  // Keep conversations this tab learnt of after the server answered.
  for (const [id, old] of inbox) if (!next.has(id)) next.set(id, old);
  inbox = next;
  renderInbox();
  markRead();
  await Promise.all([...inbox.values()].filter((e) => e.kind === 'dm' && !members.has(e.id)).map((e) => loadMembers(e.id)));
  watchPresence();
}

async function loadMembers(conv) {
  const cached = localStorage.getItem(`switchboard.members.${conv}`);
  const entry = inbox.get(conv);
  if (cached && entry?.kind === 'dm') {
    members.set(conv, JSON.parse(cached));
  } else {
    try {
      const full = await client.conversation(conv);
      members.set(conv, full.members);
      // A DM's members never change: keep them across reloads.
      if (full.kind === 'dm') localStorage.setItem(`switchboard.members.${conv}`, JSON.stringify(full.members));
      if (entry) Object.assign(entry, { kind: full.kind, name: full.name, created_at: full.created_at });
    } catch {
      return;
    }
  }
  renderInbox();
  if (conv === current) renderHead();
}

function dmPeer(conv) {
  return (members.get(conv) || []).find((u) => u !== me) || null;
}

function title(entry) {
  if (entry.kind === 'group') return entry.name;
  return dmPeer(entry.id) || 'Direct message';
}

function activity(e) {
  return e.last_message ? e.last_message.ts : e.created_at || 0;
}

function renderInbox() {
  const entries = [...inbox.values()].sort((a, b) => activity(b) - activity(a) || (a.id < b.id ? -1 : 1));
  const items = entries.map((e) => {
    const li = document.createElement('li');
    li.dataset.conv = e.id;
    const b = document.createElement('button');
    b.type = 'button';
    b.className = 'conv-item';
    if (e.id === current) b.setAttribute('aria-current', 'true');
    const name = document.createElement('span');
    name.className = 'conv-name';
    const peer = e.kind === 'dm' ? dmPeer(e.id) : null;
    if (peer) name.append(dot(peer));
    name.append(document.createTextNode(title(e)));
    const preview = document.createElement('span');
    preview.className = 'preview';
    const last = e.last_message;
    preview.textContent = last ? `${last.from === me ? 'You' : last.from}: ${last.body}` : 'No messages yet';
    b.append(name, preview);
    if (e.unread > 0 && e.id !== current) {
      const badge = document.createElement('span');
      badge.className = 'badge';
      badge.dataset.unread = String(e.unread);
      badge.innerHTML = `${e.unread}<span class="visually-hidden"> unread</span>`;
      b.append(badge);
    }
    b.addEventListener('click', () => openConversation(e.id));
    li.append(b);
    return li;
  });
  $('conv-list').replaceChildren(...items);
  $('inbox-empty').hidden = entries.length > 0;
}

/** A presence dot for `user` (empty while the server offers no presence or has not told). */
function dot(user) {
  const s = document.createElement('span');
  s.className = 'dot';
  s.dataset.user = user;
  const p = presence.get(user);
  if (presenceOn && p) {
    s.dataset.presence = p.state;
    s.setAttribute('role', 'img');
    s.setAttribute('aria-label', `${user} is ${p.state}`);
    s.title = p.state === 'online' || !p.last_seen ? p.state : `last seen ${new Date(p.last_seen).toLocaleString()}`;
  } else {
    s.hidden = true;
  }
  return s;
}

function renderPresence() {
  renderInbox();
  if (current) renderHead();
}

async function watchPresence() {
  if (!presenceOn || !client) return;
  const users = new Set();
  for (const [conv, list] of members) {
    if (inbox.get(conv)?.kind === 'dm' || conv === current) list.forEach((u) => u !== me && users.add(u));
  }
  if (users.size === 0) return;
  client.subscribePresence(users);
  const now = await client.presence([...users]);
  if (now) {
    for (const p of now) presence.set(p.user, p);
    renderPresence();
  }
}

// ---- creating a conversation --------------------------------------------------------------------------------

const createForm = $('create-form');
function syncKind() {
  const group = createForm.elements.kind.value === 'group';
  for (const el of createForm.querySelectorAll('.group-only')) el.hidden = !group;
  $('create-name').required = group;
}
createForm.addEventListener('change', syncKind);
syncKind();

createForm.addEventListener('submit', async (e) => {
  e.preventDefault();
  const kind = createForm.elements.kind.value;
  const list = $('create-members').value.split(/[\s,]+/).filter(Boolean);
  const spec = kind === 'dm' ? { kind, members: list } : { kind, name: $('create-name').value.trim(), members: list };
  if (kind === 'dm' && list.length !== 1) {
    $('create-error').textContent = 'A direct message has exactly one other member.';
    return;
  }
  try {
    const conv = await client.createConversation(spec);
    members.set(conv.id, conv.members);
    const old = inbox.get(conv.id);
    inbox.set(conv.id, { ...conv, read_seq: old ? old.read_seq : 0, unread: old ? old.unread : 0 });
    $('create-error').textContent = '';
    createForm.reset();
    syncKind();
    $('new-conv').open = false;
    await openConversation(conv.id);
    watchPresence();
  } catch (err) {
    $('create-error').textContent = `Could not create it: ${err.message}`;
  }
});

// ---- a conversation -----------------------------------------------------------------------------------------

async function openConversation(conv) {
  current = conv;
  document.body.classList.add('conv-open');
  $('conv').hidden = false;
  $('no-conv').hidden = true;
  $('typing').textContent = '';
  renderInbox();
  renderHead();
  let view = views.get(conv);
  const list = $('messages');
  list.replaceChildren();
  if (!view) {
    view = { messages: new Map(), oldest: null, hasOlder: false, loadingOlder: false };
    views.set(conv, view);
    try {
      const page = await client.history(conv, { limit: PAGE });
      for (const m of page.messages) view.messages.set(m.seq, m);
      view.oldest = page.messages.length ? page.messages[0].seq : null;
      view.hasOlder = page.has_more;
      // The page holds every message up to its last seq: from there on the socket keeps it whole.
      client.track(conv, page.messages.length ? page.messages[page.messages.length - 1].seq : 0);
    } catch (err) {
      views.delete(conv);
      notice(`Could not load the conversation: ${err.message}`);
      return;
    }
  }
  if (current !== conv) return;
  renderMessages(view);
  $('body').focus();
  if (!members.has(conv) || inbox.get(conv)?.kind !== 'dm') loadMembers(conv).then(watchPresence);
  markRead();
  fillScreen(view);
}

function renderHead() {
  const entry = inbox.get(current);
  if (!entry) return;
  $('conv-title').textContent = title(entry);
  const who = $('conv-members');
  const list = members.get(current) || [];
  who.replaceChildren(
    ...list.map((u) => {
      const s = document.createElement('span');
      s.className = 'member';
      s.append(dot(u), document.createTextNode(u === me ? `${u} (you)` : u));
      return s;
    }),
  );
}

$('back').addEventListener('click', () => {
  current = null;
  document.body.classList.remove('conv-open');
  $('conv').hidden = true;
  $('no-conv').hidden = false;
  renderInbox();
});

function messageEl(m, state) {
  const li = document.createElement('li');
  const mine = m.from === me;
  li.className = `msg ${mine ? 'mine' : 'theirs'}`;
  li.dataset.msgId = m.msg_id;
  if (m.seq !== undefined) li.dataset.seq = String(m.seq);
  if (!mine && inbox.get(m.conv)?.kind === 'group') {
    const from = document.createElement('span');
    from.className = 'from';
    from.textContent = m.from;
    li.append(from);
  }
  const body = document.createElement('p');
  body.className = 'body';
  body.textContent = m.body;
  const meta = document.createElement('span');
  meta.className = 'meta';
  if (m.ts) {
    const t = document.createElement('time');
    t.dateTime = new Date(m.ts).toISOString();
    t.textContent = new Date(m.ts).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    meta.append(t);
  }
  li.append(body, meta);
  if (mine) {
    const tick = document.createElement('span');
    tick.className = 'tick';
    meta.append(tick);
    setTick(li, state || tickState(m.conv, m.seq));
  }
  return li;
}

const TICKS = {
  pending: ['◷', 'Sending'],
  sent: ['✓', 'Sent'],
  delivered: ['✓✓', 'Delivered'],
  read: ['✓✓', 'Read'],
  failed: ['!', 'Not sent'],
};

function setTick(li, state) {
  li.dataset.state = state;
  const tick = li.querySelector('.tick');
  if (!tick) return;
  tick.textContent = TICKS[state][0];
  tick.setAttribute('aria-label', TICKS[state][1]);
  tick.title = TICKS[state][1];
}

function tickState(conv, seq) {
  const others = (members.get(conv) || []).filter((u) => u !== me);
  const seen = receipts.get(conv);
  if (!others.length || !seen) return 'sent';
  const at = (u, k) => seen.get(u)?.[k] || 0;
  if (others.every((u) => at(u, 'read') >= seq)) return 'read';
  if (others.every((u) => Math.max(at(u, 'delivered'), at(u, 'read')) >= seq)) return 'delivered';
  return 'sent';
}

function nearBottom(list) {
  return list.scrollHeight - list.scrollTop - list.clientHeight < 80;
}

function renderMessages(view) {
  const list = $('messages');
  const confirmed = [...view.messages.values()].sort((a, b) => a.seq - b.seq).map((m) => messageEl(m));
  const pending = client.pending(current).map((p) => pendingEl(p.msgId, p.body));
  list.replaceChildren(...confirmed, ...pending);
  list.scrollTop = list.scrollHeight;
}

function pendingEl(msgId, body) {
  return messageEl({ conv: current, msg_id: msgId, from: me, body }, 'pending');
}

/** Put a stored message at its seq's place (pending sends stay last). */
function place(m) {
  const list = $('messages');
  const stick = nearBottom(list);
  const el = messageEl(m);
  let before = null;
  for (const li of list.children) {
    if (li.dataset.seq === undefined || Number(li.dataset.seq) > m.seq) {
      before = li;
      break;
    }
  }
  list.insertBefore(el, before);
  if (stick) list.scrollTop = list.scrollHeight;
}

function onMessage(m, tracked) {
  let entry = inbox.get(m.conv);
  if (!entry) {
    // No event announces a new conversation: its first message does (protocol §6).
    entry = { id: m.conv, kind: null, name: null, created_at: m.ts, last_seq: 0, last_message: null, read_seq: 0, unread: 0 };
    inbox.set(m.conv, entry);
    if (!fetching.has(m.conv)) {
      fetching.add(m.conv);
      loadMembers(m.conv).then(watchPresence);
    }
  }
  if (m.seq > entry.last_seq) {
    entry.last_seq = m.seq;
    entry.last_message = m;
  }
  entry.unread = Math.max(0, entry.last_seq - entry.read_seq);
  if (m.from !== me) {
    deliveredDue.set(m.conv, Math.max(deliveredDue.get(m.conv) || 0, m.seq));
    deliveredTimer ||= setTimeout(flushDelivered, 250);
    typing.get(m.conv)?.delete(m.from);
    if (m.conv === current) renderTyping();
  }
  const view = views.get(m.conv);
  if (tracked && view) {
    view.messages.set(m.seq, m);
    if (m.conv === current) place(m);
  }
  markRead();
  renderInbox();
}

function flushDelivered() {
  deliveredTimer = null;
  for (const [conv, seq] of deliveredDue) client?.delivered(conv, seq);
  deliveredDue.clear();
}

function onAck(msgId) {
  // The stored message follows as a `message` event and takes its place by seq.
  $('messages').querySelector(`li[data-msg-id="${CSS.escape(msgId)}"]:not([data-seq])`)?.remove();
}

function onSendFailed({ msgId, conv, body, code, message }) {
  const li = $('messages').querySelector(`li[data-msg-id="${CSS.escape(msgId)}"]:not([data-seq])`);
  if (!li || conv !== current) return;
  setTick(li, 'failed');
  const why = document.createElement('span');
  why.className = 'why';
  why.textContent = `Not sent (${code}${message ? `: ${message}` : ''}). `;
  const retry = document.createElement('button');
  retry.type = 'button';
  retry.textContent = 'Retry';
  retry.addEventListener('click', () => {
    li.remove();
    sendBody(body);
  });
  li.append(why, retry);
}

/** Read up to the last message when the open conversation is on screen. */
function markRead() {
  if (!current || document.visibilityState !== 'visible' || !client) return;
  const seq = client.lastSeq(current);
  const entry = inbox.get(current);
  if (!seq || !entry) return;
  client.read(current, seq);
  entry.read_seq = Math.max(entry.read_seq, seq);
  entry.unread = Math.max(0, entry.last_seq - entry.read_seq);
}
document.addEventListener('visibilitychange', () => {
  markRead();
  renderInbox();
});
window.addEventListener('focus', () => client && refreshInbox());

function onReceipt({ conv, user, kind, seq }) {
  if (user === me) {
    // Another device of mine: a read there is a read here (the badge clears on every tab).
    const entry = inbox.get(conv);
    if (kind === 'read' && entry && seq > entry.read_seq) {
      entry.read_seq = seq;
      entry.unread = Math.max(0, entry.last_seq - seq);
      renderInbox();
    }
    return;
  }
  if (!receipts.has(conv)) receipts.set(conv, new Map());
  const seen = receipts.get(conv);
  const r = seen.get(user) || { delivered: 0, read: 0 };
  r[kind] = Math.max(r[kind] || 0, seq);
  seen.set(user, r);
  if (conv !== current) return;
  for (const li of $('messages').querySelectorAll('li.mine[data-seq]')) setTick(li, tickState(conv, Number(li.dataset.seq)));
}

function onTyping({ conv, user }) {
  if (user === me) return;
  if (!typing.has(conv)) typing.set(conv, new Map());
  typing.get(conv).set(user, Date.now() + 4000);
  if (conv === current) renderTyping();
}

function renderTyping() {
  const now = Date.now();
  const who = [...(typing.get(current) || new Map())].filter(([, until]) => until > now).map(([u]) => u);
  $('typing').textContent = who.length === 0 ? '' : `${who.join(' and ')} ${who.length === 1 ? 'is' : 'are'} typing…`;
}
setInterval(() => current && renderTyping(), 1000);

// ---- older pages --------------------------------------------------------------------------------------------

async function loadOlder(view) {
  if (!view.hasOlder || view.loadingOlder || view.oldest === null) return;
  view.loadingOlder = true;
  const conv = current;
  try {
    const page = await client.history(conv, { before: view.oldest, limit: PAGE });
    if (conv !== current) return;
    const list = $('messages');
    const height = list.scrollHeight;
    const first = list.firstChild;
    for (const m of page.messages) {
      if (view.messages.has(m.seq)) continue;
      view.messages.set(m.seq, m);
      list.insertBefore(messageEl(m), first);
    }
    view.oldest = page.messages.length ? page.messages[0].seq : view.oldest;
    view.hasOlder = page.has_more && page.messages.length > 0;
    list.scrollTop += list.scrollHeight - height;
  } catch (err) {
    notice(`Could not load older messages: ${err.message}`);
  } finally {
    view.loadingOlder = false;
  }
}

/** Load older pages until the list can scroll (a short first page leaves no way to scroll up). */
async function fillScreen(view) {
  const list = $('messages');
  while (view === views.get(current) && view.hasOlder && list.scrollHeight <= list.clientHeight) {
    await loadOlder(view);
  }
}

$('messages').addEventListener('scroll', () => {
  const view = views.get(current);
  if (view && $('messages').scrollTop < 100) loadOlder(view);
});

// ---- composing ----------------------------------------------------------------------------------------------

function sendBody(body) {
  if (!current) return;
  const msgId = client.send(current, body);
  const list = $('messages');
  list.append(pendingEl(msgId, body));
  list.scrollTop = list.scrollHeight;
}

$('composer').addEventListener('submit', (e) => {
  e.preventDefault();
  const text = $('body').value;
  if (!text.trim()) return;
  if (new TextEncoder().encode(text).length > MAX_BODY_BYTES) {
    notice(`A message holds at most ${MAX_BODY_BYTES} bytes.`);
    return;
  }
  sendBody(text);
  $('body').value = '';
});

$('body').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.altKey && !e.ctrlKey && !e.metaKey && !e.isComposing) {
    e.preventDefault();
    $('composer').requestSubmit();
  }
});

$('body').addEventListener('input', () => current && client?.typing(current));

start();
