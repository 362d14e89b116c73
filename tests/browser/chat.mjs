// Switchboard's browser client in headless Chromium, driven by Playwright. Run by tests/browser.rs, which
// starts the node and answers `@@ kill` / `@@ start` on this script's stdin; see that file.
//
// Every step asserts on what a person would see (and on the server's history where "no lost, no doubled
// message" must be proved). Steps depend on each other: the first failure ends the run. Prints one line per
// step and "N passed, N failed" at the end; exits non-zero on any failure.
import { createInterface } from 'node:readline';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const URL = process.env.SB_URL;
const ADMIN_TOKEN = process.env.SB_ADMIN_TOKEN;
const NODE_NAME = process.env.SB_NODE_NAME;
const ARTIFACTS = process.env.SB_ARTIFACTS || 'artifacts';
const CHROMIUM = process.env.SB_CHROMIUM || '/usr/bin/chromium';
const WAIT = 20000;
mkdirSync(ARTIFACTS, { recursive: true });

// ---- the harness's restarts -----------------------------------------------------------------------------------

const input = createInterface({ input: process.stdin });
const answers = [];
const waiters = [];
input.on('line', (l) => (waiters.length ? waiters.shift()(l) : answers.push(l)));
function control(cmd, reply) {
  console.log(`@@ ${cmd}`);
  return new Promise((resolve, reject) => {
    const check = (l) => (l.trim() === reply ? resolve() : reject(new Error(`harness answered ${l}`)));
    if (answers.length) check(answers.shift());
    else waiters.push(check);
  });
}

// ---- helpers ---------------------------------------------------------------------------------------------------

function assert(ok, what) {
  if (!ok) throw new Error(what);
}

async function shot(page, name) {
  await page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });
}

/** Wait until `fn(arg)` is truthy in the page; the failure says `what`. */
async function until(page, what, fn, arg) {
  const t = Date.now();
  try {
    const r = await page.waitForFunction(fn, arg, { timeout: WAIT, polling: 100 });
    if (Date.now() - t > 2000) console.log(`#   waited ${Date.now() - t} ms for ${what}`);
    return r;
  } catch (e) {
    throw new Error(`timed out waiting for ${what}`);
  }
}

const bodies = (page) => page.$$eval('#messages li .body', (els) => els.map((e) => e.textContent));

/** Every message body on screen, in order, with its state; fails unless each of `expected` shows exactly once. */
async function showsOnce(page, who, expected) {
  await until(
    page,
    `${who} to show ${JSON.stringify(expected)} once each, none pending`,
    (want) => {
      const lis = [...document.querySelectorAll('#messages li')];
      return want.every((w) => lis.filter((li) => li.querySelector('.body').textContent === w && li.dataset.seq).length === 1)
        && !lis.some((li) => li.dataset.state === 'pending');
    },
    expected,
  );
  const all = await bodies(page);
  for (const w of expected) {
    const n = all.filter((b) => b === w).length;
    assert(n === 1, `${who} shows "${w}" ${n} times`);
  }
  const seqs = await page.$$eval('#messages li[data-seq]', (els) => els.map((e) => Number(e.dataset.seq)));
  for (let i = 1; i < seqs.length; i++) assert(seqs[i] === seqs[i - 1] + 1, `${who}: seqs ${seqs.join(',')} not in order without gaps`);
  return all;
}

async function connected(page, who) {
  await until(page, `${who} to be connected`, () => document.getElementById('conn').dataset.state === 'open');
}

async function signIn(context, user) {
  const page = await context.newPage();
  watch(page, user);
  await page.goto(URL);
  await page.getByLabel('User name').fill(user);
  await page.getByRole('button', { name: 'Sign in with dev login' }).click();
  await connected(page, user);
  const me = await page.locator('#me').textContent();
  assert(me === user, `signed in as ${me}`);
  return page;
}

async function send(page, text) {
  await page.getByLabel('Message', { exact: true }).fill(text);
  await page.getByLabel('Message', { exact: true }).press('Enter');
}

async function create(page, kind, memberNames, name) {
  await page.getByText('New conversation').click();
  await page.getByLabel(kind === 'dm' ? 'Direct message' : 'Group', { exact: true }).check();
  await page.getByLabel('Members (names, separated by commas)').fill(memberNames);
  if (name) await page.getByLabel('Group name').fill(name);
  await page.getByRole('button', { name: 'Create' }).click();
  await until(page, `the new conversation ${name || memberNames} to open`, (t) => document.getElementById('conv-title').textContent === t, name || memberNames);
  return page.$eval('.conv-item[aria-current="true"]', (b) => b.parentElement.dataset.conv);
}

async function openConv(page, conv) {
  await until(page, `conversation ${conv} in the list`, (c) => !!document.querySelector(`li[data-conv="${c}"] button`), conv);
  await page.locator(`li[data-conv="${conv}"] button`).click();
  await until(page, 'the conversation to open', (c) => document.querySelector('.conv-item[aria-current="true"]')?.parentElement.dataset.conv === c, conv);
}

async function badge(page, conv) {
  return page.$eval(`li[data-conv="${conv}"]`, (li) => Number(li.querySelector('.badge')?.dataset.unread || 0)).catch(() => 0);
}

async function rest(method, path, token, body) {
  const r = await fetch(`${URL}${path}`, {
    method,
    headers: { authorization: `Bearer ${token}`, ...(body ? { 'content-type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  assert(r.ok, `${method} ${path}: HTTP ${r.status}`);
  return r.json();
}

async function token(user) {
  const r = await fetch(`${URL}/v1/dev/token`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ user }) });
  return (await r.json()).token;
}

/** The server's whole history of a conversation, ascending. */
async function history(conv) {
  const t = await token('alice');
  const out = [];
  let after = 0;
  for (;;) {
    const page = await rest('GET', `/v1/conversations/${conv}/messages?after=${after}&limit=200`, t);
    out.push(...page.messages);
    if (!page.has_more) return out;
    after = page.messages[page.messages.length - 1].seq;
  }
}

/** Uncaught errors and console errors, minus the browser's own reports of refused sockets during the outage. */
const problems = [];
function watch(page, who) {
  page.on('pageerror', (e) => problems.push(`${who}: uncaught ${e.message}`));
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    const t = m.text();
    // The operator's wrong token and frank's forged JWT are refused on purpose.
    if ((who === 'operator' || who === 'frank') && /401 \(Unauthorized\)/.test(t)) return;
    // erin's GET /v1/presence is answered 404 on purpose.
    if (who === 'erin' && /404 \(Not Found\)/.test(t)) return;
    if (/WebSocket connection to .* failed|ERR_CONNECTION_REFUSED|ERR_EMPTY_RESPONSE/.test(t)) return;
    problems.push(`${who}: console error: ${t}`);
  });
}

// ---- the run ---------------------------------------------------------------------------------------------------

const steps = [];
const step = (name, fn) => steps.push({ name, fn });
const s = {}; // shared between steps

step('the node serves the page and its assets with their types and cache headers', async () => {
  const r = await fetch(`${URL}/`);
  assert(r.status === 200, `GET / → ${r.status}`);
  assert(r.headers.get('content-type').startsWith('text/html'), `content-type ${r.headers.get('content-type')}`);
  assert(r.headers.get('cache-control') === 'no-cache', `cache-control ${r.headers.get('cache-control')}`);
  assert(/default-src 'self'/.test(r.headers.get('content-security-policy') || ''), 'no CSP');
  const html = await r.text();
  const app = html.match(/src="(\/app\/[0-9a-f]+\/app\.js)"/);
  assert(app, 'the page names no versioned app.js');
  const js = await fetch(`${URL}${app[1]}`);
  assert(js.headers.get('content-type').startsWith('text/javascript'), `app.js content-type ${js.headers.get('content-type')}`);
  assert(/immutable/.test(js.headers.get('cache-control')), `app.js cache-control ${js.headers.get('cache-control')}`);
  const again = await fetch(`${URL}/`, { headers: { 'if-none-match': r.headers.get('etag') } });
  assert(again.status === 304, `revalidation → ${again.status}`);
});

step('alice and bob sign in with dev login (two browser contexts)', async () => {
  s.browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
  s.ctxA = await s.browser.newContext({ viewport: { width: 1100, height: 750 } });
  s.ctxB = await s.browser.newContext({ viewport: { width: 1100, height: 750 } });
  s.alice = await signIn(s.ctxA, 'alice');
  s.bob = await signIn(s.ctxB, 'bob');
});

step('alice creates a DM with bob and sends with the keyboard; it shows pending, then sent', async () => {
  s.dm = await create(s.alice, 'dm', 'bob');
  await send(s.alice, 'hello bob');
  await showsOnce(s.alice, 'alice', ['hello bob']);
  const state = await s.alice.$eval('#messages li.mine', (li) => li.dataset.state);
  assert(['sent', 'delivered', 'read'].includes(state), `alice's message is ${state}`);
});

step("bob sees the DM with an unread badge; opening it clears the badge and alice sees 'read'", async () => {
  await until(s.bob, 'the DM with a badge of 1 in bob\'s list', (c) => document.querySelector(`li[data-conv="${c}"] .badge`)?.dataset.unread === '1', s.dm);
  await until(s.bob, 'the DM named after alice', (c) => document.querySelector(`li[data-conv="${c}"] .conv-name`)?.textContent === 'alice', s.dm);
  await shot(s.bob, '01-bob-unread');
  await openConv(s.bob, s.dm);
  await showsOnce(s.bob, 'bob', ['hello bob']);
  assert((await badge(s.bob, s.dm)) === 0, 'the badge stays after opening');
  await until(s.alice, "alice's message marked read", () => document.querySelector('#messages li.mine')?.dataset.state === 'read');
  // The read position is stored a few milliseconds after the receipt goes out (protocol §4).
  const bobToken = await token('bob');
  let entry;
  for (let i = 0; i < 50; i++) {
    entry = (await rest('GET', '/v1/conversations', bobToken)).conversations.find((c) => c.id === s.dm);
    if (entry.read_seq === 1) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert(entry.unread === 0 && entry.read_seq === 1, `bob's stored read position: ${JSON.stringify(entry)}`);
});

step('bob types (alice sees it) and answers', async () => {
  await s.bob.getByLabel('Message', { exact: true }).pressSequentially('hi al', { delay: 20 });
  await until(s.alice, 'bob is typing', () => document.getElementById('typing').textContent === 'bob is typing…');
  await shot(s.alice, '02-alice-typing');
  await s.bob.getByLabel('Message', { exact: true }).fill('hi alice');
  await s.bob.getByLabel('Message', { exact: true }).press('Enter');
  await showsOnce(s.alice, 'alice', ['hello bob', 'hi alice']);
  await showsOnce(s.bob, 'bob', ['hello bob', 'hi alice']);
  await until(s.alice, 'the typing line to clear with the message', () => document.getElementById('typing').textContent === '');
});

step("a second tab of alice is another device: it sees the DM, and its send reaches alice's first tab and bob", async () => {
  s.alice2 = await s.ctxA.newPage();
  watch(s.alice2, 'alice/tab2');
  await s.alice2.goto(URL);
  await connected(s.alice2, 'alice/tab2');
  await openConv(s.alice2, s.dm);
  await showsOnce(s.alice2, 'alice/tab2', ['hello bob', 'hi alice']);
  await send(s.alice2, 'from tab two');
  for (const [p, who] of [[s.alice, 'alice'], [s.alice2, 'alice/tab2'], [s.bob, 'bob']]) {
    await showsOnce(p, who, ['hello bob', 'hi alice', 'from tab two']);
  }
  const mine = await s.alice.$eval('#messages li[data-seq="3"]', (li) => li.classList.contains('mine'));
  assert(mine, "tab two's message is not shown as alice's own in tab one");
});

step('kill -9 mid-conversation: both pages show the outage; a send made meanwhile stays pending', async () => {
  // A burst written to the socket at once and the server killed right after: some may be acknowledged,
  // some not; the page must resend the rest with the same msg_id, and the server must not store any twice.
  await s.alice.evaluate(() => {
    for (let i = 1; i <= 5; i++) {
      document.getElementById('body').value = `burst ${i}`;
      document.getElementById('composer').requestSubmit();
    }
  });
  await control('kill', 'killed');
  for (const [p, who] of [[s.alice, 'alice'], [s.bob, 'bob'], [s.alice2, 'alice/tab2']]) {
    await until(p, `${who} to show it is offline`, () => ['waiting', 'connecting'].includes(document.getElementById('conn').dataset.state));
  }
  await send(s.alice, 'sent while down');
  await send(s.bob, 'bob while down');
  const state = await s.alice.$eval('#messages li:last-child', (li) => li.dataset.state);
  assert(state === 'pending', `the message sent while down is ${state}`);
  await shot(s.alice, '03-alice-offline');
});

step('after the restart every page recovers: no message lost, none doubled (pages and stored history)', async () => {
  await control('start', 'started');
  const want = ['hello bob', 'hi alice', 'from tab two', 'burst 1', 'burst 2', 'burst 3', 'burst 4', 'burst 5', 'sent while down', 'bob while down'];
  const seen = [];
  for (const [p, who] of [[s.alice, 'alice'], [s.bob, 'bob'], [s.alice2, 'alice/tab2']]) {
    await connected(p, who);
    seen.push(await showsOnce(p, who, want));
  }
  assert(seen.every((b) => JSON.stringify(b) === JSON.stringify(seen[0])), `the pages disagree on the order: ${JSON.stringify(seen)}`);
  const stored = await history(s.dm);
  for (const w of want) {
    const n = stored.filter((m) => m.body === w).length;
    assert(n === 1, `the server stored "${w}" ${n} times: ${JSON.stringify(stored.map((m) => [m.seq, m.body]))}`);
  }
  assert(stored.length === want.length, `the server stored ${stored.length} messages, not ${want.length}`);
  assert(stored.every((m, i) => m.seq === i + 1), 'stored seqs have a gap');
  await shot(s.alice, '04-alice-recovered');
  await shot(s.bob, '04-bob-recovered');
});

step('a group of three: carol learns of it from its first message; all three see the same messages in order', async () => {
  s.ctxC = await s.browser.newContext({ viewport: { width: 1100, height: 750 } });
  s.carol = await signIn(s.ctxC, 'carol');
  s.group = await create(s.alice, 'group', 'bob, carol', 'trio');
  await send(s.alice, 'hello trio');
  for (const [p, who] of [[s.bob, 'bob'], [s.carol, 'carol']]) {
    await until(p, `${who} to list the group with 1 unread`, (c) => document.querySelector(`li[data-conv="${c}"] .badge`)?.dataset.unread === '1', s.group);
    await openConv(p, s.group);
  }
  await send(s.carol, 'carol here');
  await showsOnce(s.carol, 'carol', ['hello trio', 'carol here']);
  await send(s.bob, 'bob here');
  const want = ['hello trio', 'carol here', 'bob here'];
  const seen = [];
  for (const [p, who] of [[s.alice, 'alice'], [s.bob, 'bob'], [s.carol, 'carol']]) seen.push(await showsOnce(p, who, want));
  assert(seen.every((b) => JSON.stringify(b) === JSON.stringify(want)), `group order: ${JSON.stringify(seen)}`);
  // Alice's second tab never opened the group: it learnt of it from the first message (sent by its other
  // device), and its badge clears because the first tab, which has the group open, reads it.
  await until(s.alice2, "the group listed without a badge in alice's second tab", (c) => {
    const li = document.querySelector(`li[data-conv="${c}"]`);
    return li && !li.querySelector('.badge') && li.querySelector('.preview').textContent === 'bob: bob here';
  }, s.group);
  const from = await s.alice.$$eval('#messages li.theirs .from', (els) => els.map((e) => e.textContent));
  assert(JSON.stringify(from) === '["carol","bob"]', `group senders shown as ${from}`);
  await shot(s.carol, '05-carol-group');
});

step('older history loads page by page on scroll, without a gap or a repeat', async () => {
  const dave = await token('dave');
  const dm = await rest('POST', '/v1/conversations', dave, { kind: 'dm', members: ['alice'] });
  for (let i = 1; i <= 120; i++) await rest('POST', `/v1/conversations/${dm.id}/messages`, dave, { msg_id: `old-${i}`, body: `old ${i}` });
  await openConv(s.alice, dm.id);
  await until(s.alice, 'the newest page', () => document.querySelectorAll('#messages li').length >= 50);
  const first = await s.alice.$$eval('#messages li', (els) => els.length);
  assert(first < 120, `the first page already holds ${first} messages`);
  for (let i = 0; i < 20 && (await s.alice.$$eval('#messages li', (els) => els.length)) < 120; i++) {
    await s.alice.$eval('#messages', (el) => el.scrollTo(0, 0));
    await s.alice.waitForTimeout(200);
  }
  await showsOnce(s.alice, 'alice', Array.from({ length: 120 }, (_, i) => `old ${i + 1}`));
  const seqs = await s.alice.$$eval('#messages li', (els) => els.map((e) => Number(e.dataset.seq)));
  assert(seqs.length === 120 && seqs[0] === 1 && seqs[119] === 120, `seqs ${seqs[0]}…${seqs[seqs.length - 1]} (${seqs.length})`);
});

step('the inbox is newest first', async () => {
  await openConv(s.bob, s.dm);
  await send(s.bob, 'bump the DM');
  await until(s.alice, "the DM with bob at the top of alice's list", (c) => document.querySelector('#conv-list li')?.dataset.conv === c, s.dm);
  const order = await s.alice.$$eval('#conv-list li', (els) => els.map((e) => e.dataset.conv));
  assert(order.length === 3 && order[0] === s.dm && order[1] !== s.group, `alice's inbox order ${order}`);
});

step('works at phone width: one pane at a time, no sideways scroll', async () => {
  await s.alice2.setViewportSize({ width: 390, height: 844 });
  const wide = await s.alice2.evaluate(() => document.documentElement.scrollWidth);
  assert(wide <= 390, `the page is ${wide}px wide at 390px`);
  assert(!(await s.alice2.locator('.sidebar').isVisible()), 'the list shows beside an open conversation');
  await shot(s.alice2, '06-phone-conversation');
  await s.alice2.getByRole('button', { name: 'Back to conversations' }).click();
  assert(await s.alice2.locator('.sidebar').isVisible(), 'back shows no list');
  await shot(s.alice2, '07-phone-list');
  await openConv(s.alice2, s.dm);
  await send(s.alice2, 'from the phone');
  await showsOnce(s.bob, 'bob', ['from the phone']);
});

step('controls are labelled and text is readable (WCAG AA contrast)', async () => {
  const unlabelled = await s.alice.evaluate(() =>
    [...document.querySelectorAll('input, textarea, select, button')]
      .filter((el) => el.offsetParent !== null)
      .filter((el) => !(el.labels?.length || el.getAttribute('aria-label') || (el.tagName === 'BUTTON' && el.textContent.trim())))
      .map((el) => el.outerHTML.slice(0, 80)));
  assert(unlabelled.length === 0, `unlabelled controls: ${unlabelled}`);
  const ratios = await s.bob.evaluate(() => {
    const rgb = (c) => c.match(/[\d.]+/g).slice(0, 3).map(Number);
    const lum = ([r, g, b]) => {
      const f = (v) => ((v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
      return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
    };
    const bg = (el) => {
      for (; el; el = el.parentElement) {
        const c = getComputedStyle(el).backgroundColor;
        if (c !== 'rgba(0, 0, 0, 0)' && c !== 'transparent') return rgb(c);
      }
      return [255, 255, 255];
    };
    return ['#messages li.mine .body', '#messages li.theirs .body', '#messages li.mine .meta', '#messages li.theirs .meta',
      '#messages li.mine[data-state="read"] .tick',
      '.preview', '#conn', '.conv-name', 'h1', '.badge']
      .map((sel) => [sel, document.querySelector(sel)])
      .filter(([, el]) => el)
      .map(([sel, el]) => {
        const [a, b] = [lum(rgb(getComputedStyle(el).color)), lum(bg(el))];
        return [sel, (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)];
      });
  });
  assert(ratios.length >= 8, `only ${ratios.length} elements measured`);
  const low = ratios.filter(([, r]) => r < 4.5);
  assert(low.length === 0, `contrast below 4.5:1: ${JSON.stringify(low)}`);
});

step('presence: the DM shows bob online; the open conversation shows dave, who never connected, offline', async () => {
  await until(s.alice, "bob's dot online in alice's list", (c) => document.querySelector(`li[data-conv="${c}"] .dot`)?.dataset.presence === 'online', s.dm);
  await until(s.alice, "dave's dot offline in the conversation's header", () =>
    [...document.querySelectorAll('#conv-members .member')].some((m) => m.textContent === 'dave' && m.querySelector('.dot').dataset.presence === 'offline'));
  const label = await s.alice.$eval(`li[data-conv="${s.dm}"] .dot`, (d) => d.getAttribute('aria-label'));
  assert(label === 'bob is online', `the dot is labelled ${label}`);
  const notice = await s.alice.locator('#notice').textContent();
  assert(notice === '', `the page shows an error: ${notice}`);
});

step('the operator page refuses a wrong token and shows the node, its connections, counters and the cluster', async () => {
  const ctx = await s.browser.newContext({ viewport: { width: 1100, height: 900 } });
  const page = await ctx.newPage();
  watch(page, 'operator');
  await page.goto(`${URL}/admin`);
  await page.getByLabel("Admin token (the node's admin_token)").fill('wrong');
  await page.getByRole('button', { name: 'Show this node' }).click();
  await until(page, 'the refusal', () => /Refused/.test(document.getElementById('error').textContent));
  assert(await page.locator('#panels').isHidden(), 'panels shown with a wrong token');
  await page.getByLabel("Admin token (the node's admin_token)").fill(ADMIN_TOKEN);
  await page.getByRole('button', { name: 'Show this node' }).click();
  await until(page, 'the node panel', (n) => document.querySelector('dd[data-field="name"]')?.textContent === n, NODE_NAME);
  const field = (f) => page.$eval(`dd[data-field="${f}"]`, (d) => d.textContent);
  assert((await field('state')) === 'up', `state ${await field('state')}`);
  assert(Number(await field('connections')) >= 4, `connections ${await field('connections')}`);
  assert(Number(await field('online_users')) === 3, `online users ${await field('online_users')}`);
  const convs = await page.$$eval('#convs code', (els) => els.map((e) => e.textContent));
  assert(convs.includes(s.group), `hosted conversations ${convs} lack the group`);
  await until(page, 'a rate column after two reads', () => [...document.querySelectorAll('#metrics tr[data-metric="switchboard_messages_stored_total"] td')][3]?.textContent !== '');
  const stored = await page.$eval('#metrics tr[data-metric="switchboard_messages_stored_total"] td.num', (td) => Number(td.textContent));
  assert(stored >= 3 + 120 + 2, `messages stored ${stored}`);
  const nodes = await page.$$eval('#cluster tr', (trs) => trs.map((tr) => [tr.dataset.node, tr.children[1].textContent]));
  assert(JSON.stringify(nodes) === JSON.stringify([[NODE_NAME, 'up']]), `cluster ${JSON.stringify(nodes)}`);
  await shot(page, '08-admin');
  await ctx.close();
});

step('signing in by pasting a JWT: a forged one is refused, a real one works', async () => {
  const ctx = await s.browser.newContext({ viewport: { width: 1100, height: 750 } });
  const page = await ctx.newPage();
  watch(page, 'frank');
  await page.goto(URL);
  const real = await token('frank');
  const [head, , sig] = real.split('.');
  const forged = [head, Buffer.from(JSON.stringify({ sub: 'alice', exp: 4102444800 })).toString('base64url'), sig].join('.');
  await page.getByLabel('Or paste a token (JWT)').fill(forged);
  await page.getByRole('button', { name: 'Sign in with token' }).click();
  await until(page, 'the refusal', () => document.getElementById('signin-error').textContent === 'The server refused that token.');
  await page.getByLabel('Or paste a token (JWT)').fill(real);
  await page.getByRole('button', { name: 'Sign in with token' }).click();
  await connected(page, 'frank');
  assert((await page.locator('#me').textContent()) === 'frank', 'not signed in as frank');
  await ctx.close();
});

step('a server without presence (unknown_op, 404) leaves the page working, with no dots and no error', async () => {
  // erin's browser sees an older server: presence_subscribe is refused, GET /v1/presence is not found.
  const ctx = await s.browser.newContext({ viewport: { width: 1100, height: 750 } });
  await ctx.route((url) => url.pathname === '/v1/presence', (route) => route.fulfill({ status: 404, body: '' }));
  let refused = 0;
  await ctx.routeWebSocket((url) => url.pathname === '/v1/ws', (ws) => {
    const server = ws.connectToServer();
    ws.onMessage((m) => {
      if (JSON.parse(m).op === 'presence_subscribe') {
        refused += 1;
        ws.send(JSON.stringify({ op: 'error', code: 'unknown_op', message: 'unknown op' }));
      } else {
        server.send(m);
      }
    });
  });
  const erin = await signIn(ctx, 'erin');
  const conv = await create(erin, 'dm', 'alice');
  await send(erin, 'no presence here');
  await showsOnce(erin, 'erin', ['no presence here']);
  assert(refused >= 1, 'erin never asked for presence');
  const dots = await erin.$$eval('.dot', (els) => els.filter((e) => !e.hidden).length);
  assert(dots === 0, `${dots} presence dots shown without presence`);
  const notice = await erin.locator('#notice').textContent();
  assert(notice === '', `the page shows an error: ${notice}`);
  await shot(erin, '09-erin-without-presence');
  // Later subscriptions are not sent again to a server that refused the op.
  const before = refused;
  await openConv(erin, conv);
  await erin.waitForTimeout(300);
  assert(refused === before, 'presence_subscribe sent again after unknown_op');
  await ctx.close();
});

step("bob leaves: alice's list shows him offline after the grace period", async () => {
  await s.ctxB.close();
  await until(s.alice, "bob's dot offline", (c) => document.querySelector(`li[data-conv="${c}"] .dot`)?.dataset.presence === 'offline', s.dm);
  const title = await s.alice.$eval(`li[data-conv="${s.dm}"] .dot`, (d) => d.title);
  assert(/^last seen /.test(title), `the offline dot says "${title}"`);
});

step('no uncaught error and no console error on any page', async () => {
  assert(problems.length === 0, problems.join('\n'));
});

let passed = 0;
let failed = 0;
const started = Date.now();
for (const [i, { name, fn }] of steps.entries()) {
  const t = Date.now();
  try {
    await fn();
    passed += 1;
    console.log(`ok ${i + 1} - ${name} (${Date.now() - t} ms)`);
  } catch (e) {
    failed += 1;
    console.log(`not ok ${i + 1} - ${name}\n  ${String(e.stack || e).replace(/\n/g, '\n  ')}`);
    for (const [who, p] of [['alice', s.alice], ['alice2', s.alice2], ['bob', s.bob], ['carol', s.carol]]) {
      if (p) await shot(p, `failed-${i + 1}-${who}`).catch(() => {});
    }
    break;
  }
}
await s.browser?.close();
input.close();
console.log(`browser: ${steps.length} steps in ${((Date.now() - started) / 1000).toFixed(1)} s`);
console.log(`${passed} passed, ${failed + steps.length - passed - failed} failed`);
process.exit(failed ? 1 : 0);
