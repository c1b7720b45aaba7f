"""Runs a CLI agent program inside a sandbox; copied there by `megaflow.agent.cli` (stdlib only).

Never imported by MegaFlow: its source is sent into the sandbox and run with the
sandbox's ``python3``. It relays ``127.0.0.1:PORT`` (loopback: sandboxes have no
other network) to the model proxy's Unix socket, runs the program with the endpoint
in its environment, then tells the proxy that the program exited and with what.

Usage: ``python3 cli_runner.py CONFIG`` where CONFIG is base64 JSON
(command, port, task); the proxy's bearer token comes in ``$MEGAFLOW_TOKEN``.
"""

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time

SOCKET = "/run/megaflow/model.sock"
HOME = "/tmp/.megaflow"
#: How long to keep telling the proxy of the exit (it may be restarting).
REPORT_FOR_S = 300.0


def _pipe(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _serve(server):
    while True:
        conn, _ = server.accept()
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            up.connect(SOCKET)
        except OSError:
            conn.close()
            continue
        threading.Thread(target=_pipe, args=(conn, up), daemon=True).start()
        threading.Thread(target=_pipe, args=(up, conn), daemon=True).start()


def relay(port):
    """Listen on 127.0.0.1:`port`; every connection is piped to the proxy's socket."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(128)
    threading.Thread(target=_serve, args=(server,), daemon=True).start()


def report(token, code, output):
    """POST the exit to the proxy until it answers 2xx (it resumes the episode)."""
    body = json.dumps({"exit_code": code, "output": output}).encode()
    head = (f"POST /megaflow/exit HTTP/1.1\r\nHost: megaflow\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    until, wait = time.monotonic() + REPORT_FOR_S, 0.2
    while time.monotonic() < until:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(30)
                s.connect(SOCKET)
                s.sendall(head.encode() + body)
                status = s.recv(64).split(b" ", 2)
                if len(status) > 1 and status[1][:1] == b"2":
                    return
                if len(status) > 1 and status[1][:1] == b"4":
                    sys.stderr.write(f"megaflow: the proxy refused the exit report: {status!r}\n")
                    return
        except OSError as exc:
            sys.stderr.write(f"megaflow: exit report failed ({exc}); retrying\n")
        time.sleep(wait)
        wait = min(wait * 2, 10.0)


def main():
    config = json.loads(base64.b64decode(sys.argv[1]))
    token, port = os.environ.pop("MEGAFLOW_TOKEN"), int(config["port"])
    os.makedirs(HOME, exist_ok=True)
    task_file = os.path.join(HOME, "task.md")
    with open(task_file, "w") as f:
        f.write(config["task"])
    relay(port)
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, OPENAI_BASE_URL=base + "/v1", OPENAI_API_BASE=base + "/v1", OPENAI_API_KEY=token,
               ANTHROPIC_BASE_URL=base, ANTHROPIC_API_KEY=token, MEGAFLOW_MODEL_URL=base + "/v1",
               MEGAFLOW_TASK=config["task"], MEGAFLOW_TASK_FILE=task_file, NO_PROXY="127.0.0.1,localhost")
    log_path = os.path.join(HOME, "agent.log")
    with open(log_path, "wb") as log:
        code = subprocess.call(["bash", "-lc", config["command"]], env=env, stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT)
    with open(log_path, "rb") as log:
        log.seek(max(0, os.path.getsize(log_path) - 8000))
        output = log.read().decode("utf-8", "replace")
    report(token, code, output)


if __name__ == "__main__":
    main()
