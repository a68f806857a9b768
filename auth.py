"""Who may use the app: sign-in through an OpenID Connect provider, roles, local mode, the audit trail.

With an ``[auth]`` section in ``.streamlit/secrets.toml`` (see ``.streamlit/secrets.toml.example``)
every page needs a user signed in through Streamlit's ``st.login``, and every page and action asks
``require``/``allowed`` here, on the server, whatever the browser sends. A user's role comes from the
ID token's roles claim or from the allow-lists in ``[access]``; each role includes the ones before it.

Without ``[auth]`` the app is in local mode: one person on this machine, every feature, no sign-in.
``.streamlit/config.toml`` binds the server to 127.0.0.1; started on any other address without
``[auth]``, the features that read the server's folders or the PACS are refused.

A page calls ``require("its action")`` right after the research banner; an action inside a page
offers its widget only ``if allowed(action)`` and checks ``refusal(action)`` again when it runs, then
writes its audit line with ``record``. This module does not import ``cxr_core``: it decides who may
do what, nothing about images.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st

import audit as audit_log

ROLES = ("viewer", "clinician", "pacs-writer", "admin")
# Each page or action and the least role that may use it.
ACTIONS: dict[str, str] = {
    "classify": "viewer",         # classify uploaded images
    "instructor": "viewer",       # the instructor page
    "metrics": "viewer",          # the model's held-out results (no patient data)
    "held_out_films": "viewer",   # the instructor page's films from the model's held-out split (server files)
    "batch": "clinician",         # the batch review page
    "server_folders": "clinician",  # read images from folders under CXR_DATA_ROOT
    "pacs_search": "clinician",
    "pacs_classify": "clinician",
    "pacs_write": "pacs-writer",  # write results back to the PACS
    "choose_model": "admin",      # serve a model other than the default
    "evaluate": "admin",          # evaluate a model on a labelled server folder
}
DESCRIPTIONS = {
    "classify": "classifying images", "instructor": "the instructor page", "metrics": "the model metrics",
    "held_out_films": "showing films of the model's held-out split",
    "batch": "batch review", "server_folders": "reading folders on the server", "pacs_search": "searching the PACS",
    "pacs_classify": "classifying studies from the PACS", "pacs_write": "writing results to the PACS",
    "choose_model": "choosing another model", "evaluate": "evaluating a model on a server folder",
}
# Features that reach the server's own files or the PACS: refused in local mode off loopback.
# The held-out split's films are files on the server too: a model trained on a hospital's own films would
# show them to anyone who can reach the port.
SERVER_ACTIONS = frozenset({"server_folders", "held_out_films", "evaluate", "pacs_search", "pacs_classify",
                            "pacs_write"})
LOCAL_NOTE = "Local mode, no sign-in: do not expose this server."
EXPOSED_NOTE = ("This server listens on {address} without sign-in, so reading folders on the server (the "
                "held-out split's films too), evaluation and the PACS are switched off. Configure sign-in "
                "([auth] in .streamlit/secrets.toml) or run it on 127.0.0.1 only (server.address in "
                ".streamlit/config.toml).")
AUDITED_SESSION = "_audit_signed_in"


@dataclass(frozen=True)
class User:
    """Who is using the app: ``id`` is the e-mail (else the subject claim), ``role`` None for no role."""

    id: str
    name: str
    role: str | None
    local: bool = False


LOCAL_USER = User(id="local", name="local user", role="admin", local=True)


class SecretsUnreadable(RuntimeError):
    """A secrets file exists but cannot be read: sign-in may be configured in it, so nothing may run."""


def secrets_section(name: str) -> dict[str, Any]:
    """A section of st.secrets as a plain dict; {} when there is no secrets file or no such section.

    Raises SecretsUnreadable when a secrets file exists but cannot be read (a TOML error, a half-saved file,
    no permission): failing open would turn a hospital's sign-in into local mode, everyone an admin.
    """
    try:
        section = st.secrets.get(name)
    except Exception as exc:
        present = [str(p) for p in st.get_option("secrets.files") or [] if Path(p).exists()]
        if present:
            raise SecretsUnreadable(
                f"The secrets file {present[0]} exists but could not be read ({type(exc).__name__}). Sign-in may "
                "be configured there, so the app is closed until the file is fixed: check its TOML syntax and "
                "that this account may read it, then reload the page.") from None
        return {}  # no secrets file at all: nothing configured (local mode)
    return _plain(section) if isinstance(section, Mapping) else {}


MIN_SECRET_CHARS = 32  # the example's `secrets.token_hex(32)` gives 64
MAX_SESSION_HOURS = 12  # a sign-in older than this (the ID token's iat) signs in again


def weak_secret(secret: str) -> bool:
    """The example's placeholder (CHANGE-ME...) or shorter than ``MIN_SECRET_CHARS``: the cookie secret and the
    audit key alike."""
    return "CHANGE-ME" in secret.upper() or len(secret) < MIN_SECRET_CHARS


def weak_cookie_secret(section: Mapping[str, Any]) -> str | None:
    """Why the [auth] cookie_secret cannot protect the session cookie (it carries the user's roles), or None."""
    if weak_secret(str(section.get("cookie_secret") or "")):
        return ("The [auth] cookie_secret in .streamlit/secrets.toml is still the example's placeholder or shorter "
                f"than {MIN_SECRET_CHARS} characters: anyone could forge a signed-in session with any role. The app "
                "is closed until it is a long random string: "
                "python -c \"import secrets; print(secrets.token_hex(32))\"")
    return None


ACCESS_KEYS = ("roles_claim", "groups_claim", "max_session_hours", "trust_unverified_email", *ROLES)


def access_problem(access: Mapping[str, Any]) -> str | None:
    """What is wrong with the ``[access]`` settings (a sentence naming the setting and what it must be), or None.

    Checked before anyone is let in: a ``max_session_hours`` of "12h" would otherwise fail on every page, and 0
    send every user back to the sign-in screen for ever; a misspelt role list would silently give no one that role.
    """
    where = "in the [access] section of .streamlit/secrets.toml"
    unknown = sorted(set(access) - set(ACCESS_KEYS))
    if unknown:
        return (f"Unknown setting(s) {', '.join(unknown)} {where}; the known ones are {', '.join(ACCESS_KEYS)} "
                f"(the roles are {', '.join(ROLES)}). Fix it and restart the app.")
    hours = access.get("max_session_hours", MAX_SESSION_HOURS)
    if isinstance(hours, bool) or not isinstance(hours, int | float) or not 0 < hours <= 24 * 30:
        return (f"max_session_hours {where} is {hours!r}: it must be a number of hours above 0 and at most 720 "
                "(30 days), without quotes, e.g. max_session_hours = 12. Fix it and restart the app.")
    for key in ("roles_claim", "groups_claim"):
        if key in access and (not isinstance(access[key], str) or not access[key].strip()):
            return f"{key} {where} must be the name of an ID-token claim in quotes, e.g. {key} = \"{key[:-6]}\"."
    if "trust_unverified_email" in access and not isinstance(access["trust_unverified_email"], bool):
        return f"trust_unverified_email {where} must be true or false, without quotes."
    for role in ROLES:
        entries = access.get(role, [])
        if not (isinstance(entries, str) or (isinstance(entries, list) and all(isinstance(e, str) for e in entries))):
            return (f"{role} {where} must be a list of entries in quotes (e-mail addresses, \"group:NAME\" or "
                    f"\"*\"), e.g. {role} = [\"group:radiology\"]. Fix it and restart the app.")
    return None


AUDIT_KEYS = ("dir", "hmac_key")
SIGN_IN_LIKE = ("oauth", "oidc", "login", "signin", "sign_in", "sso", "openid")  # sections meant to be [auth]


def audit_problem(audit: Mapping[str, Any]) -> str | None:
    """What is wrong with the ``[audit]`` settings, or None: a misspelt key (``directory``) turned the trail off
    with only a grey caption, so it is refused as ``[access]`` is."""
    where = "in the [audit] section of .streamlit/secrets.toml"
    unknown = sorted(set(audit) - set(AUDIT_KEYS))
    if unknown:
        return (f"Unknown setting(s) {', '.join(unknown)} {where}; the known ones are {', '.join(AUDIT_KEYS)} "
                "(dir: the audit folder, hmac_key: the key that names studies). Fix it and restart the app.")
    for key in AUDIT_KEYS:  # an empty one is unset, as before (dir = "": the trail is off, and the sidebar says so)
        if key in audit and not isinstance(audit[key], str):
            return f"{key} {where} must be text in quotes, e.g. {key} = \"...\". Fix it and restart the app."
    return None


def sign_in_missing() -> str | None:
    """Why local mode (no sign-in, everyone an admin) must not start although the secrets file meant sign-in: an
    empty ``[auth]`` section, a section named like it (``[Auth]``, ``[oauth]``), or ``[access]`` roles with no
    ``[auth]`` to sign in with. Behind a hospital's proxy on 127.0.0.1 every visitor would be an admin."""
    try:
        names = [str(name) for name in st.secrets.keys()]
    except Exception:  # no secrets file at all (an unreadable one was refused by secrets_section already)
        return None
    where = ".streamlit/secrets.toml"
    if "auth" in names:
        return (f"The [auth] section of {where} is empty, so no one can sign in, and without sign-in everyone would "
                "be an admin: the app is closed. Fill it in (README: sign-in) or, on a machine of your own, delete "
                "the section to run without sign-in.")
    meant = [name for name in names if name.lower() == "auth" or name.lower().replace("-", "_") in SIGN_IN_LIKE]
    if meant or "access" in names:
        found = ", ".join(f"[{name}]" for name in [*meant, *(["access"] if "access" in names else [])])
        return (f"{where} has {found} but no [auth] section, so no one can sign in, and without sign-in everyone "
                "would be an admin: the app is closed. Name the sign-in section [auth] (lower case), or, on a "
                "machine of your own, delete these sections to run without sign-in.")
    return None


def user_or_stop() -> User | None:
    """``current_user``, or the page stops with the reason when the secrets cannot be read, the cookie secret
    is a placeholder, the ``[access]`` or ``[audit]`` settings are wrong, or sign-in was meant but has no
    ``[auth]`` section (``sign_in_missing``)."""
    try:
        section = secrets_section("auth")  # read once: {} is local mode
        weak = weak_cookie_secret(section) if section else sign_in_missing()
        if weak is None and section:
            weak = access_problem(secrets_section("access"))
        if weak is None:
            weak = audit_problem(secrets_section("audit"))
        if weak is None:
            return current_user()
    except SecretsUnreadable as err:
        weak = str(err)
    st.error(weak, icon="🔒")
    st.stop()


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def auth_configured() -> bool:
    """True when secrets have an [auth] section, i.e. users must sign in."""
    return bool(secrets_section("auth"))


def beyond_loopback(address: str | None) -> bool:
    """True when a server bound to ``address`` is reachable from other machines ('' or None: every interface)."""
    if not address:
        return True
    if address.strip("[]").lower() == "localhost":
        return False
    try:
        return not ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: assume it resolves off the machine
        return True


def server_address() -> str | None:
    return st.get_option("server.address")


def _claim_values(claims: Mapping[str, Any], name: str) -> set[str]:
    value = claims.get(name)
    if isinstance(value, str):
        return {value}
    if isinstance(value, (list, tuple)):
        return {str(v) for v in value}
    return set()


def email_verified(claims: Mapping[str, Any], access: Mapping[str, Any]) -> bool:
    """Whether the provider vouches for the ``email`` claim: ``email_verified`` true (a boolean or the string
    some providers send). A provider that never sends the claim (Microsoft Entra ID among them) lets users
    whose addresses it does not check name any address, so its e-mails count only with ``[access]
    trust_unverified_email = true``, for a provider where every address is the hospital's own."""
    value = claims.get("email_verified")
    if value is None:
        return access.get("trust_unverified_email") is True
    return str(value).strip().lower() in ("true", "1")


def session_expired(claims: Mapping[str, Any], access: Mapping[str, Any], now: float | None = None) -> bool:
    """Whether the sign-in is older than ``[access] max_session_hours`` (default ``MAX_SESSION_HOURS``), from
    the ID token's ``iat``. Streamlit keeps the token's claims, roles included, in a signed cookie for 30 days;
    without this a role taken away at the provider would last that long."""
    issued = claims.get("iat")
    if not isinstance(issued, int | float) or isinstance(issued, bool):
        return False  # OpenID Connect ID tokens always carry iat
    hours = access.get("max_session_hours", MAX_SESSION_HOURS)
    return (time.time() if now is None else now) - float(issued) > float(hours) * 3600


def role_for(claims: Mapping[str, Any], access: Mapping[str, Any]) -> str | None:
    """The highest role that the ID-token ``claims`` earn under the ``[access]`` settings, or None.

    A role is earned by naming it in the claim ``access["roles_claim"]`` (default "roles"), or by an
    entry in the allow-list ``access[role]``: an e-mail address (only one the provider verified:
    ``email_verified``), ``"group:NAME"`` for a value of the claim ``access["groups_claim"]`` (default
    "groups"), or ``"*"`` for anyone signed in.
    """
    earned = _claim_values(claims, str(access.get("roles_claim", "roles"))) & set(ROLES)
    email = str(claims.get("email") or "").lower()
    verified = email_verified(claims, access)
    groups = _claim_values(claims, str(access.get("groups_claim", "groups")))
    for role in ROLES:
        entries = access.get(role) or []
        for entry in [entries] if isinstance(entries, str) else entries:
            entry = str(entry)
            if (entry == "*" or (entry.startswith("group:") and entry[6:] in groups)
                    or (email and verified and entry.lower() == email)):
                earned.add(role)
    return max(earned, key=ROLES.index) if earned else None


_SIGN_INS: set[str] = set()  # this server's sign-ins already audited: a hash of the ID token's sub and iat
_SIGN_INS_LOCK = threading.Lock()


def _audit_sign_in(user: User) -> bool:
    """Write the sign_in line unless this server has written it for this sign-in already (the ID token's ``sub``
    and ``iat``, and the user): a page reload or a second tab starts another Streamlit session of the same
    sign-in, which is not audited again, so that the trail counts sign-ins (without an ``iat``, every session
    counts). True once the line is written (or the audit is off); False when it could not be (tried again on the
    next run)."""
    claims = st.user.to_dict()
    marker = None
    if claims.get("iat") is not None:
        marker = hashlib.sha256(f"{user.id}\0{claims.get('sub')}\0{claims.get('iat')}".encode()).hexdigest()
        with _SIGN_INS_LOCK:
            if marker in _SIGN_INS:
                return True
    if not _kept(record("sign_in")):
        return False
    if marker is not None:
        with _SIGN_INS_LOCK:
            _SIGN_INS.add(marker)
    return True


def current_user() -> User | None:
    """The signed-in user (local mode: the local user), or None when sign-in is needed."""
    if not auth_configured():
        return LOCAL_USER
    if not st.user.is_logged_in:
        return None
    claims = st.user.to_dict()
    access = secrets_section("access")
    if session_expired(claims, access):
        return None  # the sign-in screen: signing in again brings the provider's current roles
    email = str(claims.get("email") or "")
    # The audit names a user by an address the provider vouches for, else by the provider's subject id: an
    # unverified address could be anyone's.
    if email and email_verified(claims, access):
        user_id = email
    else:
        user_id = f"sub:{claims['sub']}" if claims.get("sub") else "unknown"
    return User(id=user_id, name=str(claims.get("name") or user_id), role=role_for(claims, access))


def refusal_for(action: str, user: User | None, *, auth_on: bool, address: str | None) -> str | None:
    """Why ``user`` may not do ``action`` (a sentence), or None when allowed."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    if not auth_on:
        if action in SERVER_ACTIONS and beyond_loopback(address):
            return EXPOSED_NOTE.format(address=address or "every network interface")
        return None
    if user is None:
        return "Sign in to use this app."
    if user.role is None:
        return (f"You are signed in as {user.id}, but you have no role in this app. "
                "Ask its administrator to give you one.")
    needed = ACTIONS[action]
    if ROLES.index(user.role) < ROLES.index(needed):
        return (f"Your role ({user.role}) does not allow {DESCRIPTIONS[action]}: it needs the {needed} role "
                "or a higher one. Ask the app's administrator if you need it.")
    return None


def refusal(action: str) -> str | None:
    """Why the current user may not do ``action`` here and now, or None when allowed."""
    return refusal_for(action, current_user(), auth_on=auth_configured(), address=server_address())


def allowed(action: str) -> bool:
    """Whether the current user may do ``action`` (pages use it to decide what to offer)."""
    return refusal(action) is None


def require(action: str) -> User:
    """Stop the page unless the current user may do ``action``: the sign-in screen, or the reason."""
    user = user_or_stop()
    if user is None:
        sign_in_ui()
        st.stop()
    reason = refusal(action)
    if reason is not None:
        st.error(reason, icon="🔒")
        record("refused", refused=action)
        st.stop()
    return user


def sign_in_ui() -> None:
    """The sign-in screen (the page shows the research banner above it)."""
    st.title("Sign in")
    if auth_configured() and st.user.is_logged_in:  # shown here while signed in: the sign-in is too old
        hours = secrets_section("access").get("max_session_hours", MAX_SESSION_HOURS)
        st.info(f"Your sign-in is older than {hours} hours: sign in again (your role is read afresh).")
    st.write("This app is only for signed-in users of the hospital. Sign in with your hospital account; "
             "what you may do depends on the role the hospital gave you.")
    if st.button("Sign in", type="primary", key="auth_sign_in"):
        st.login()


def sidebar_ui() -> None:
    """Who is signed in and the sign-out button, or the local-mode notice; audits a new signed-in session."""
    user = current_user()
    if user is None:
        return
    if user.local:
        st.sidebar.info(LOCAL_NOTE, icon="💻")
        reason = refusal_for("server_folders", user, auth_on=False, address=server_address())
        if reason:
            st.sidebar.error(reason)
        return
    if not st.session_state.get(AUDITED_SESSION) and _audit_sign_in(user):
        st.session_state[AUDITED_SESSION] = True
    st.sidebar.markdown(f"Signed in as **{user.name}** ({user.id}) · role: **{user.role or 'none'}**")
    if st.sidebar.button("Sign out", key="auth_sign_out", icon=":material/logout:"):
        record("sign_out")
        st.session_state.pop(AUDITED_SESSION, None)
        st.logout()
    if audit_folder() is None:
        st.sidebar.caption("The audit trail is off: set CXR_AUDIT_DIR (or [audit] dir in secrets).")
    elif audit_key() is None and _given_audit_key():
        st.sidebar.warning(f"The [audit] hmac_key (or CXR_AUDIT_KEY) is the example's placeholder or shorter than "
                           f"{MIN_SECRET_CHARS} characters, so it is not used: the audit trail counts studies and "
                           "server folders but cannot name them. Set a long random key: "
                           "python -c \"import secrets; print(secrets.token_hex(32))\"")
    elif audit_key() is None:
        st.sidebar.caption("The audit trail counts studies and server folders but cannot name them: set [audit] "
                           "hmac_key in secrets (or CXR_AUDIT_KEY) so that an auditor can match its lines.")


def audit_folder() -> str | None:
    """The operator's audit folder: env CXR_AUDIT_DIR, else [audit] dir in secrets; None when unset."""
    return os.environ.get("CXR_AUDIT_DIR") or secrets_section("audit").get("dir") or None


def _given_audit_key() -> str:
    return str(secrets_section("audit").get("hmac_key") or os.environ.get("CXR_AUDIT_KEY") or "")


def audit_key() -> bytes | None:
    """The secret that keys the hashes of study UIDs: [audit] hmac_key in secrets, else env CXR_AUDIT_KEY;
    None when neither is set or the key is weak (``weak_secret``: whoever reads the audit files could hash
    candidate study UIDs, structured and often guessable, under it; then studies are counted, not named)."""
    key = _given_audit_key()
    return key.encode("utf-8") if key and not weak_secret(key) else None


def record(action: str, **fields: Any) -> dict[str, Any] | None:
    """One audit line for the current user (see ``audit.AuditLog.record`` for ``fields``); None when off."""
    folder = audit_folder()
    if folder is None:
        return None
    try:
        return _append(folder, current_user(), action, **fields)
    except OSError as err:  # the page goes on, but everyone sees that the trail has a gap
        st.error(f"The audit trail could not be written to {folder} ({type(err).__name__}: {err.strerror}). "
                 "Tell the app's administrator.", icon="📝")
        return None


def _append(audit_dir: str, user: User | None, action: str, /, **fields: Any) -> dict[str, Any]:
    """The audit line of ``user`` written in ``audit_dir`` (``fields`` may hold a ``folder``); raises OSError when
    it cannot be."""
    return audit_log.AuditLog(audit_dir, audit_key()).record(user.id if user else "anonymous",
                                                          user.role if user else None, action, **fields)


def record_for(user: User | None, action: str, **fields: Any) -> bool:
    """``record`` for a user taken in the page's run, from outside any run (a download's data, which Streamlit
    makes when the browser fetches the file): True when the line was written or the audit is off, False when it
    could not be written (there is no page to say so on)."""
    folder = audit_folder()
    if folder is None:
        return True
    try:
        _append(folder, user, action, **fields)
    except OSError:
        return False
    return True


def exported(make: Callable[[], bytes | str], **fields: Any) -> Callable[[], bytes | str]:
    """A download's data (``st.download_button``'s callable) that writes the ``export`` audit line when the file
    is fetched: the browser may fetch a download's URL without the click that runs a widget callback, so an
    ``on_click`` audit could be skipped. Gives no bytes when the audit is on and its line cannot be written."""
    user = current_user()

    def data() -> bytes | str:
        return make() if record_for(user, "export", **fields) else b""

    return data


def record_once(marker: str, action: str, **fields: Any) -> dict[str, Any] | None:
    """``record`` the first time this session sees ``marker``: one line per action, not one per rerun.

    Pass a hash (of the image bytes, of the folder) as the marker, never a name.
    A line that could not be written is tried again on the next run (and its error shown again), so a gap in the
    trail is not shown once and then forgotten.
    """
    seen = st.session_state.setdefault("_audit_seen", set())
    if marker in seen:
        return None
    line = record(action, **fields)
    if _kept(line):
        seen.add(marker)
    return line


def _kept(line: dict[str, Any] | None) -> bool:
    """Whether an action ``record`` was asked to write is done with: written, or the audit is off (None from
    ``record`` either way; with the audit on, None means the write failed and should be tried again)."""
    return line is not None or audit_folder() is None
