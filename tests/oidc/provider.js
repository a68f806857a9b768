// A real OpenID Connect provider (the certified `oidc-provider` package) for the sign-in tests.
//
// Usage: node provider.js PORT REDIRECT_URI CLIENT_SECRET
// Serves http://127.0.0.1:PORT with one confidential client ("cxr-app") and the test users below,
// a plain login form (user name + password) instead of the package's development pages (those pull
// web fonts from the internet), and RP-initiated logout. Prints "READY <issuer>" once listening.
import Provider from 'oidc-provider';
import { randomBytes } from 'node:crypto';

const [port, redirectUri, clientSecret] = process.argv.slice(2);
if (!port || !redirectUri || !clientSecret) {
  console.error('usage: node provider.js PORT REDIRECT_URI CLIENT_SECRET');
  process.exit(2);
}
const issuer = `http://127.0.0.1:${port}`;

// Two users in two roles: the viewer's role comes from the app's allow-list for its group, the
// clinician's from the `roles` claim itself.
const ACCOUNTS = {
  'viewer@example.test': { password: 'viewer-pass', name: 'Vera Viewer', groups: ['cxr-teaching'], roles: [] },
  'clinician@example.test': { password: 'clinician-pass', name: 'Colin Clinician', groups: ['radiology'],
    roles: ['clinician'] },
};

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const page = (title, body) => `<!DOCTYPE html><html><head><meta charset="utf-8"><title>${esc(title)}</title></head>`
  + `<body><h1>${esc(title)}</h1>${body}</body></html>`;

const provider = new Provider(issuer, {
  clients: [{
    client_id: 'cxr-app',
    client_secret: clientSecret,
    redirect_uris: [redirectUri],
    post_logout_redirect_uris: [redirectUri],
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'], groups: ['groups', 'roles'] },
  scopes: ['openid', 'email', 'profile', 'groups'],
  // Streamlit keeps the ID token's claims (it does not call the userinfo endpoint), so put them there.
  conformIdTokenClaims: false,
  cookies: { keys: [randomBytes(32).toString('hex')] },
  features: {
    devInteractions: { enabled: false },
    rpInitiatedLogout: {
      enabled: true,
      logoutSource: async (ctx, form) => {
        ctx.body = page('Sign out of the test provider?',
          `${form}<button type="submit" form="op.logoutForm" value="yes" name="logout">Yes, sign me out</button>`);
      },
      postLogoutSuccessSource: async (ctx) => { ctx.body = page('Signed out', ''); },
    },
  },
  renderError: async (ctx, out) => {
    ctx.type = 'html';
    ctx.body = page('Provider error', `<pre>${esc(JSON.stringify(out))}</pre>`);
  },
  findAccount: async (_ctx, id) => {
    const account = ACCOUNTS[id];
    if (!account) return undefined;
    return {
      accountId: id,
      claims: async () => ({ sub: id, email: id, email_verified: true, name: account.name, groups: account.groups,
        roles: account.roles }),
    };
  },
});

async function formBody(req) {
  let raw = '';
  for await (const chunk of req) raw += chunk;
  return new URLSearchParams(raw);
}

function loginForm(uid, message = '') {
  return page('Test provider sign-in', `${message ? `<p role="alert">${esc(message)}</p>` : ''}
    <form method="post" action="/interaction/${esc(uid)}/login">
      <label>User <input name="login" autocomplete="off"></label>
      <label>Password <input name="password" type="password"></label>
      <button type="submit">Sign in</button>
    </form>`);
}

// The login (and implicit consent) interaction.
provider.use(async (ctx, next) => {
  const match = ctx.path.match(/^\/interaction\/([^/]+)(\/login)?$/);
  if (!match) return next();
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  ctx.type = 'html';
  if (ctx.method === 'GET') {
    ctx.body = loginForm(details.uid);
    return undefined;
  }
  const form = await formBody(ctx.req);
  const accountId = form.get('login') || '';
  const account = ACCOUNTS[accountId];
  if (!account || account.password !== form.get('password')) {
    ctx.status = 401;
    ctx.body = loginForm(details.uid, 'Unknown user or wrong password.');
    return undefined;
  }
  const grant = new provider.Grant({ accountId, clientId: details.params.client_id });
  grant.addOIDCScope(details.params.scope);
  const grantId = await grant.save();
  const redirectTo = await provider.interactionResult(ctx.req, ctx.res,
    { login: { accountId }, consent: { grantId } }, { mergeWithLastSubmission: false });
  ctx.redirect(redirectTo);
  return undefined;
});

provider.listen(Number(port), '127.0.0.1', () => console.log(`READY ${issuer}`));
