"""The UI's login gate. Streamlit has no authentication of its own, and whoever opens the UI can run every
model (docs/security.md), so a UI that others can reach asks each browser session for the token first.

`chorus ui` gives the token to the Streamlit process in `$CHORUS_UI_TOKEN` (environment, never argv: `ps`
shows argv to every user); it refuses to listen beyond loopback without one. A Streamlit started by hand on
a non-loopback `server.address` with no token shows only a refusal. The token is compared in constant time;
a session that gave it stays signed in until the browser tab is closed or reloaded.

`gate()` runs in app.py before st.navigation, and again in `ui.common.chorus()`, which every page calls
first: a page file run without app.py is gated too. (The pages were in ui/pages/, which Streamlit runs
straight, without app.py, when a browser asks for one (/history) before any st.navigation call; they are in
ui/views/, so app.py answers every URL, but the second gate stays.)
"""

from __future__ import annotations

import hmac
import os
import time

import streamlit as st

from orchestrator.config.hosts import is_loopback

TOKEN_ENV = "CHORUS_UI_TOKEN"
_SIGNED_IN = "_chorus_signed_in"
WRONG_TOKEN_DELAY_S = 1.0  # each wrong guess costs the guesser a second of that session


def token() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


def exposed_without_token() -> bool:
    """Served on a non-loopback address with no token (Streamlit started by hand, not by `chorus ui`)."""
    address = st.get_option("server.address")
    return token() is None and bool(address) and not is_loopback(str(address))


def gate() -> None:
    """Return when this session may use the UI; otherwise show the sign-in form (or the refusal) and stop
    the script, so no page runs."""
    expected = token()
    if expected is None:
        if exposed_without_token():
            st.error(f"This UI listens on {st.get_option('server.address')} without a token: it is not shown. "
                     f"Start it with `chorus ui --host HOST --allow-remote --token-file FILE` (or set "
                     f"${TOKEN_ENV}), or listen on 127.0.0.1.")
            st.stop()
        return
    if st.session_state.get(_SIGNED_IN) is True:
        return
    st.title("chorus: sign in")
    with st.form("sign-in"):
        given = st.text_input("Access token", type="password", key="sign-in-token",
                              help="The token `chorus ui` was started with (its --token-file or $CHORUS_UI_TOKEN).")
        submitted = st.form_submit_button("Sign in")
    if submitted:
        if hmac.compare_digest(given.strip().encode(), expected.encode()):
            st.session_state[_SIGNED_IN] = True
            st.rerun()
        time.sleep(WRONG_TOKEN_DELAY_S)
        st.error("Wrong token.")
    st.stop()
