"""The model proxy of CLI agents: every call an agent program makes is a model hop.

One per env worker process (`ensure`): an aiohttp server in one thread with one event
loop, on the Unix socket ``<data_dir>/cli-proxy/model.sock``. That directory is bound
read-only into CLI agents' sandboxes (and nothing else reaches out of them); inside,
the runner (`megaflow.agent.cli_runner`) relays ``127.0.0.1:PORT`` to it. A request
carries its episode's bearer token (`token`: an HMAC of the episode id under this
host's key), so a sandbox can only ever speak as its own episode.

A call is recorded as a turn exactly as a native scaffold's: a ``steps`` row holding
the messages it adds to the conversation (`prepare`), then the ordinary
``megaflow.hop.generate`` message on the model queue (rate limits, retries, policy
version, token ids and logprobs, all as for any model hop); the proxy awaits the
hop's ledger row and answers from the step row. Waiting costs a coroutine, never a
thread: 1,000 programs in flight are 1,000 parked episodes and a few timers here.

The program's exit (`/megaflow/exit`, sent by the runner) or its deadline resumes
the parked episode (`resume`): a last step is recorded and the episode's decision is
sent with the chord options the episode parked with (`Driver.after_program`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
from pathlib import Path

from aiohttp import web
from sqlalchemy import func, insert, select, tuple_, update

from megaflow.agent.cli import socket_dir, socket_path
from megaflow.contract import error_text
from megaflow.db import states
from megaflow.db.models import Episode, Hop, Step, utcnow
from megaflow.hops.cli_resume import resume
from megaflow.hops.model_hop import conversation
from megaflow.hops.routing import HOP_TASKS, label
from megaflow.model import chat_api
from megaflow.model.chat_api import BadRequest
from queues import topology

log = logging.getLogger(__name__)

#: How long a model call may wait for its hop before the program is told it failed.
CALL_TIMEOUT_S = 3600.0
#: Seconds after an episode's deadline at which the proxy wakes it (its decision ends it).
DEADLINE_GRACE_S = 1.0
#: The calls one poll asks about per query.
_POLL_CHUNK = 500
#: Between polls of the ledger while calls wait: from the first to the longest (seconds).
POLL_FIRST_S, POLL_MAX_S = 0.005, 0.05
_E, _S, _H = Episode.__table__, Step.__table__, Hop.__table__


class Refused(Exception):
    """A call the episode may not make (ended, over its limits); HTTP `status` with this text."""

    def __init__(self, text: str, status: int = 403):
        super().__init__(text)
        self.status = status


def host_key(data_dir: Path) -> bytes:
    """This host's token key (``<data_dir>/cli-proxy.key``, made once, outside the bound directory)."""
    path = Path(data_dir) / "cli-proxy.key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_bytes()
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        return path.read_bytes()


def token(key: bytes, episode_id: str) -> str:
    """The episode's bearer token: its id and an HMAC of it (no state to keep or lose)."""
    return f"{episode_id}.{hmac.new(key, episode_id.encode(), hashlib.sha256).hexdigest()[:40]}"


def episode_of(key: bytes, header: str | None) -> str | None:
    """The episode a ``Bearer`` header speaks for, or None if its token is not genuine."""
    value = (header or "").removeprefix("Bearer ").strip()
    episode_id = value.rpartition(".")[0]
    if episode_id and hmac.compare_digest(value, token(key, episode_id)):
        return episode_id
    return None


# -- the rows (synchronous; run in the loop's executor) --------------------------------


def _arguments(text):
    try:
        return json.loads(text or "{}")
    except (TypeError, ValueError):
        return text


def _comparable(m) -> tuple:
    # A call the program sends back is compared by what it says: clients rewrite its JSON (Anthropic's
    # ``input`` is an object, re-serialised) and add fields of their own.
    calls = [(c.get("id"), (c.get("function") or {}).get("name"), _arguments((c.get("function") or {}).get("arguments")))
             for c in m.tool_calls or []]
    return m.role, m.content, json.dumps(calls, sort_keys=True), m.tool_call_id


def prepare(rt, episode_id: str, messages: list, tools: list[dict] | None = None,
            tool_choice: str | dict | None = None) -> tuple[str, int]:
    """Record the call as a new step; returns (run id, step index).

    The step holds only what the program added since the recorded conversation (so
    `conversation` rebuilds exactly what was sent, and exports read it as any
    scaffold's turns: its tool results as ``tool`` messages), and the tools the call
    offers (OpenAI shape), which its model hop offers the model. A program that rewrites its history is refused: its turns
    could not be recorded as one conversation.

    Raises:
        Refused: the episode is not running here, or a limit is reached.
    """
    try:
        rt.warm(episode_id)  # SQLite (the embedded stack): the spec is read before the write transaction
    except LookupError:
        raise Refused(f"episode {episode_id} is not running an agent program") from None
    with rt.session() as s:
        ep = s.execute(select(_E.c.run_id, _E.c.state, _E.c.parked, _E.c.tokens, _E.c.deadline_at)
                       .where(_E.c.id == episode_id).with_for_update()).first()
        if ep is None or ep.state != states.RUNNING or not (ep.parked or {}).get("cli"):
            raise Refused(f"episode {episode_id} is not running an agent program")
        limits = rt.spec(ep.run_id).limits
        index = s.execute(select(func.max(_S.c.index)).where(_S.c.episode_id == episode_id)).scalar() + 1
        if index > limits.max_steps:
            raise Refused(f"step limit reached ({limits.max_steps} model calls)", 429)
        if ep.tokens > limits.max_tokens:
            raise Refused(f"token limit reached ({limits.max_tokens} tokens)", 429)
        before = conversation(s, episode_id, index)
        if [_comparable(m) for m in messages[:len(before)]] != [_comparable(m) for m in before]:
            raise Refused("the conversation does not extend the recorded one (history rewritten); MegaFlow "
                          "records each episode as one conversation", 400)
        s.execute(insert(_S).values(episode_id=episode_id, index=index,
                                    messages_in=[m.wire() for m in messages[len(before):]],
                                    tools=tools, tool_choice=tool_choice))
        s.execute(update(_E).where(_E.c.id == episode_id).values(n_steps=index + 1))
    return ep.run_id, index


def outcomes(rt, keys: list[tuple[str, int]]) -> dict[tuple[str, int], dict]:
    """The finished model hops among `keys` (episode, step): each one's failure, or its recorded turn.

    One query for every call waiting on this host (two when some finished), however many.
    """
    found: dict[tuple[str, int], dict] = {}
    with rt.session(readonly=True) as s:
        for i in range(0, len(keys), _POLL_CHUNK):
            chunk = keys[i:i + _POLL_CHUNK]
            done = s.execute(select(_H.c.subject_id, _H.c.step_index, _H.c.result).where(
                _H.c.hop == "generate", _H.c.status == "done",
                tuple_(_H.c.subject_id, _H.c.step_index).in_(chunk))).all()
            turns = []
            for eid, index, result in done:
                if (result or {}).get("error"):
                    found[(eid, index)] = result
                else:
                    turns.append((eid, index))
            if turns:
                rows = s.execute(select(_S.c.episode_id, _S.c.index, _S.c.completion, _S.c.tool_calls,
                                        _S.c.finish_reason, _S.c.prompt_tokens, _S.c.completion_tokens, _S.c.model)
                                 .where(tuple_(_S.c.episode_id, _S.c.index).in_(turns))).all()
                for row in rows:
                    found[(row.episode_id, row.index)] = dict(row._mapping)
    return found


def running_here(rt) -> list[tuple[str, dt.datetime | None]]:
    """CLI episodes parked on this host: (id, deadline), for a restarted proxy to watch again."""
    with rt.session(readonly=True) as s:
        rows = s.execute(select(_E.c.id, _E.c.deadline_at, _E.c.parked).where(
            _E.c.state == states.RUNNING, _E.c.host == rt.settings.host, _E.c.parked.is_not(None))).all()
    return [(eid, deadline) for eid, deadline, parked in rows if (parked or {}).get("cli")]


# -- the server ------------------------------------------------------------------------


class CliProxy:
    """The proxy of one env worker process; `start` it once (`ensure`)."""

    def __init__(self, app, rt):
        self.app, self.rt = app, rt
        self.dir = socket_dir(rt.settings.data_dir)
        self.path = socket_path(rt.settings.data_dir)  # OSError, one line, if too long (env workers check at start)
        self.key = host_key(rt.settings.data_dir)
        self.loop = asyncio.new_event_loop()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        #: Calls waiting for their model hop, by (episode, step); one poller serves them all.
        self._pending: dict[tuple[str, int], asyncio.Future] = {}
        self._poller: asyncio.Task | None = None
        #: Where model hops go (the model queue by default; a benchmark's private one).
        self.model_queue: str | None = None
        self.calls = 0

    def token(self, episode_id: str) -> str:
        return token(self.key, episode_id)

    def start(self) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run():
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self._serve())
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=run, name="megaflow-cli-proxy", daemon=True).start()
        ready.wait(30)
        if failure:
            raise failure[0]
        for episode_id, deadline in running_here(self.rt):
            self.watch(episode_id, deadline)

    async def _serve(self) -> None:
        web_app = web.Application(client_max_size=64 << 20)
        web_app.add_routes([
            web.post("/v1/chat/completions", self._openai), web.post("/chat/completions", self._openai),
            web.post("/v1/messages", self._anthropic), web.post("/messages", self._anthropic),
            web.get("/v1/models", self._models), web.post("/megaflow/exit", self._exit),
        ])
        runner = web.AppRunner(web_app, access_log=None)
        await runner.setup()
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        self.path.unlink(missing_ok=True)  # left by an earlier worker of this host
        # A deep backlog: a thousand programs may connect at once (a full one refuses at once).
        await web.UnixSite(runner, str(self.path), backlog=4096).start()
        os.chmod(self.path, 0o666)  # the sandboxes' users are not ours

    def watch(self, episode_id: str, deadline: dt.datetime | None) -> None:
        """Wake the episode once its deadline has passed, if the program has not ended by then."""
        if deadline is None:
            return
        aware = deadline if deadline.tzinfo else deadline.replace(tzinfo=dt.UTC)
        delay = max(0.0, (aware - utcnow()).total_seconds()) + DEADLINE_GRACE_S

        def arm():
            old = self._timers.pop(episode_id, None)
            if old is not None:
                old.cancel()
            self._timers[episode_id] = self.loop.call_later(
                delay, lambda: self.loop.create_task(self._deadline(episode_id)))

        self.loop.call_soon_threadsafe(arm)

    async def _deadline(self, episode_id: str) -> None:
        self._timers.pop(episode_id, None)
        try:
            if await self.loop.run_in_executor(None, resume, self.rt, self.app, episode_id, None):
                log.info("episode %s: deadline passed with its agent program running; ending it", episode_id)
        except Exception:  # logged; the host's recovery finds the episode
            log.exception("episode %s: could not wake it at its deadline", episode_id)

    # -- handlers -------------------------------------------------------------------

    def _episode(self, request: web.Request) -> str:
        episode_id = episode_of(self.key, request.headers.get("Authorization") or
                                (f"Bearer {request.headers['x-api-key']}" if "x-api-key" in request.headers
                                 else None))
        if episode_id is None:
            raise web.HTTPUnauthorized(text=json.dumps(chat_api.error_body("bad or missing bearer token")),
                                       content_type="application/json")
        return episode_id

    async def _models(self, request: web.Request) -> web.Response:
        self._episode(request)
        return web.json_response({"object": "list", "data": [{"id": "megaflow", "object": "model"}]})

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        return await self._call(request, anthropic=False)

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._call(request, anthropic=True)

    async def _call(self, request: web.Request, anthropic: bool) -> web.StreamResponse:
        episode_id = self._episode(request)
        try:
            body = await request.json()
            messages = (chat_api.anthropic_messages if anthropic else chat_api.openai_messages)(body)
            tools = chat_api.openai_tools(body, anthropic), chat_api.openai_tool_choice(body, anthropic)
            outcome = await self._generate(episode_id, messages, *tools)
        except (BadRequest, ValueError) as exc:
            return web.json_response(chat_api.error_body(str(exc), anthropic), status=400)
        except Refused as exc:
            return web.json_response(chat_api.error_body(str(exc), anthropic), status=exc.status)
        except Exception as exc:  # the database or broker failed: the program may try again
            log.warning("model proxy: a call of episode %s failed", episode_id, exc_info=True)
            return web.json_response(chat_api.error_body(error_text(exc), anthropic, "api_error"), status=503)
        if outcome.get("error"):
            agent = outcome.get("kind") == "agent"
            return web.json_response(chat_api.error_body(outcome["error"], anthropic,
                                                         "invalid_request_error" if agent else "api_error"),
                                     status=400 if agent else 502)
        model = outcome.get("model") or str(body.get("model") or "megaflow")
        if anthropic:
            return web.json_response(chat_api.anthropic_response(outcome, model))
        response = chat_api.openai_response(outcome, model)
        if body.get("stream"):
            return web.Response(body=chat_api.openai_stream(response), content_type="text/event-stream")
        return web.json_response(response)

    async def _generate(self, episode_id: str, messages: list, tools: list[dict] | None = None,
                        tool_choice: str | dict | None = None) -> dict:
        """Record the call, send its model hop, and wait (asleep) for its outcome."""
        lock = self._locks.setdefault(episode_id, asyncio.Lock())
        async with lock:  # one call of an episode at a time: its turns are one conversation
            run_id, index = await self.loop.run_in_executor(None, prepare, self.rt, episode_id, messages, tools,
                                                            tool_choice)
            key = (episode_id, index)
            self._pending[key] = waiting = self.loop.create_future()
            try:
                await self.loop.run_in_executor(None, self._send, run_id, episode_id, index)
                self.calls += 1
                if self._poller is None:
                    self._poller = self.loop.create_task(self._poll())
                return await asyncio.wait_for(waiting, CALL_TIMEOUT_S)
            except TimeoutError:
                raise Refused(f"the model hop of step {index} did not finish in {CALL_TIMEOUT_S:g}s", 504) from None
            finally:
                self._pending.pop(key, None)

    async def _poll(self) -> None:
        """Resolve waiting calls from the ledger, all in one query per round, while any wait."""
        wait = POLL_FIRST_S
        try:
            while self._pending:
                try:
                    found = await self.loop.run_in_executor(None, outcomes, self.rt, list(self._pending))
                except Exception:  # a lost database connection: the next round tries again
                    log.warning("model proxy: polling the ledger failed", exc_info=True)
                    found = {}
                for key, outcome in found.items():
                    waiting = self._pending.pop(key, None)
                    if waiting is not None and not waiting.done():
                        waiting.set_result(outcome)
                wait = POLL_FIRST_S if found else min(wait * 1.5, POLL_MAX_S)
                await asyncio.sleep(wait)
        finally:
            self._poller = None

    def _send(self, run_id: str, episode_id: str, index: int) -> None:
        q = self.model_queue
        options = {"queue": q, "exchange": topology.EXCHANGE.name, "routing_key": q} if q else {}
        self.app.signature(HOP_TASKS["generate"], args=(episode_id, index), **options,
                           argsrepr=label(run_id, episode_id, index, "generate")).apply_async()

    async def _exit(self, request: web.Request) -> web.Response:
        episode_id = self._episode(request)
        try:
            body = await request.json()
            code = int(body["exit_code"])
        except (ValueError, KeyError, TypeError):
            return web.json_response(chat_api.error_body("exit report needs an integer exit_code"), status=400)
        timer = self._timers.pop(episode_id, None)
        if timer is not None:
            timer.cancel()
        self._locks.pop(episode_id, None)
        resumed = await self.loop.run_in_executor(None, resume, self.rt, self.app, episode_id, code,
                                                  str(body.get("output") or "")[-8000:])
        log.info("episode %s: agent program exited %d%s", episode_id, code, "" if resumed else " (already resumed)")
        return web.json_response({"resumed": resumed})


def ensure(app, rt) -> CliProxy:
    """This worker's proxy, started on first use (like the runtime's other per-process caches)."""
    with _START_LOCK:
        proxy = getattr(rt, "_megaflow_cli_proxy", None)
        if proxy is None:
            proxy = CliProxy(app, rt)
            proxy.start()
            rt._megaflow_cli_proxy = proxy
        return proxy


#: Serialises the first start of a worker's proxy (its threads may launch programs at once).
_START_LOCK = threading.Lock()
