"""`specserve chat`: an interactive streaming chat client over the public gRPC API.

Reads one message per line (a terminal or a pipe), streams the reply, prints a one-line summary
of the round stats to stderr. Commands: /new (a new session), /history, /quit.
"""

from __future__ import annotations

import sys
from typing import TextIO

from .client import Client, ClientError

HELP = "type a message and Enter; /new starts a new session, /history shows it, /quit (or Ctrl-D) leaves"


def run_chat(client: Client, session_id: str = "", system: str = "", inp: TextIO | None = None,
             out: TextIO | None = None, err: TextIO | None = None, **kw) -> int:
    """The REPL; returns the exit code (1 when the last turn failed). kw: `client.request_fields`.

    inp / out / err default to this process's stdin / stdout / stderr at call time.
    """
    inp, out, err = inp or sys.stdin, out or sys.stdout, err or sys.stderr
    tty = inp.isatty()
    if tty:
        print(HELP, file=err)
    code = 0
    while True:
        if tty:
            out.write("you> ")
            out.flush()
        line = inp.readline()
        if not line:
            break
        msg = line.strip()
        if not msg:
            continue
        if msg == "/quit":
            break
        if msg == "/new":
            session_id = ""
            print("(new session)", file=err)
            continue
        try:
            if msg == "/history":
                if not session_id:
                    print("(no session yet)", file=err)
                    continue
                for t in client.get_session(session_id).turns:
                    print(f"{t.role}: {t.content}{'' if t.complete else ' [cut short]'}", file=out)
                continue
            stats, token = None, ""
            for chunk in client.chat(msg, session_id=session_id, system=system, **kw):
                session_id, token = chunk.session_id, token or chunk.session_token
                out.write(chunk.text)
                out.flush()
                if chunk.HasField("stats"):
                    stats = chunk.stats
            out.write("\n")
            if token:  # a session this turn started
                print(f"(new session {session_id}: continue it elsewhere with --session {session_id} "
                      f"--session-token {token})", file=err)
            code = 0
            if stats is not None:
                print(f"[session {session_id} | {stats.mode} | {stats.new_tokens} tokens, {stats.tokens_per_s:.1f} tok/s, "
                      f"acceptance {stats.acceptance_rate:.2f}, prefix reused {stats.prefix_reused}]", file=err)
        except ClientError as e:
            print(f"specserve chat: {e.code}: {e.details}", file=err)
            code = 1
    return code
