"""ota-agent: run the jobs the ota-bridge service sends to this device, one at a time.

    ota-agent --broker mqtt[s]://HOST:PORT --device-id ID --server-key-file FILE ...

Its flags and OTA_AGENT_* variables are read in agent/settings.py; a missing or bad value exits 2.
Commands run through /bin/sh with the agent's environment minus those OTA_AGENT_* variables,
plus OTA_DEVICE_ID and OTA_JOB_ID.

Before anything about a head (agent/head.py) is journalled or run, the agent checks it, in this
order: it is signed, its signature verifies with a key the agent trusts (--server-key-file,
re-read when it changes), it is for this device, it was issued recently (only while the agent
has no state: no Floor), its Seq is above the Floor it has verified and not older than a job
this device already ran, and its command is inside the local policy (agent/policy.py). A job
head that fails is REJECTED with the reason, and nothing runs. Only a verified head cancels a
running job: a newer job head, or an idle head (no job pending) whose Floor covers it; an empty
payload is not a head and is ignored.

Threads: paho's network thread only turns callbacks into events on a bounded queue
(agent/link.py); the main thread reads that queue, decides, writes the journal and publishes;
one worker thread, started by the first job and kept (agent/worker.py), runs each command in turn
(spawned held by the main thread, which journals the start with its process group before the
worker lets it run: agent/runner.py; after each job, the
main thread starts the next job's shell, a runner.Standby, while the service handles the result,
and keeps it while the agent waits: the next job, whether a queue drains or it comes alone hours
later, finds its shell spawned, and its path from head to result holds no fork or exec of the
held shell. An agent that has run no job since it started has none, and has not loaded the
runner). A job
whose head names Artifacts first has them fetched and checked by a download thread
(agent/download.py): the journal's "started" entry is written only once every file is in the
cache and in the job's directory, so an agent restarted mid-download fetches on from the part
file. At
start-up, before it connects, the agent kills any command an earlier agent left running
(Agent.stop_leftovers). Stale heads the broker queued for this persistent session while the
agent was away arrive before the SUBACK, so the agent acts on a head only once its subscription
is acknowledged and SUBSCRIBE_SETTLE_SECONDS have passed: by then the retained head, the
current truth, has replaced them.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time

# The C half of the signal module: `signal` itself builds its Signals, Handlers and Sigmasks enums
# at import (~3.4 million instructions of every start, bench/profile_notes.md,
# agent-exec-until-online), and the agent only sets two handlers; agent/runner.py, loaded by the
# first job, imports `signal`.
from _signal import SIGINT, SIGTERM
from _signal import signal as set_signal_handler
from typing import TYPE_CHECKING, Any, Callable, Mapping, Union

from . import job_signature, jsonlog, protocol
from .artifact_cache import ArtifactCache
from .journal import Entry, Journal, JournalError, UnsafeDirectory, check_private_dir
from .link import (
    BrokerLink,
    Connected,
    ConnectFailed,
    Disconnected,
    EventQueue,
    JobMessage,
    LinkEvent,
    QueueEmpty,
    QueueFull,
    Subscribed,
)
from .protocol import JobStatus, Key, MessageError, Presence
from .settings import ENV_PREFIX, Settings, SettingsError, TrustedKeys, agent_version, load_settings
from .untrusted import shown

if TYPE_CHECKING:
    # Imported where first needed, not at start: agent/head.py and agent/runner.py by the first head
    # (or a command an earlier agent left running), agent/download.py by the first job with Artifacts.
    # An agent that only connects and waits never loads them (bench/profile_notes.md,
    # agent-exec-until-online).
    from .download import JobDownload, Progress
    from .head import Head
    from .runner import ProcessGroup, Runner, RunResult, Standby
    from .worker import Worker

log = logging.getLogger("ota-agent")

# Reasons of a REJECTED job, besides the signature's (job_signature) and "the job is for device X".
STALE = "the job is older than one this device already ran"
BELOW_FLOOR = "the job is at or below the floor: the service has canceled, deleted or ended it"
OUTSIDE_POLICY = "the command is outside this device's policy"
# Logged once per run of credential refusals (the link slows its retries down meanwhile).
CREDENTIALS_HINT = ("the broker refused the device's credentials (user %s): if its password was rotated or is "
                    "wrong, give it a new one with POST /v1/device/%s/credentials, put that in --password-file "
                    "and restart the agent; until then it retries, doubling the wait up to every 5 minutes")
# A head signed without an IssuedAt: from a service older than this agent (protocol v1), or forged.
NO_ISSUE_TIME = "the head has no IssuedAt: it comes from an older service (protocol v1) or is forged"
NO_SIGNED_HEAD = ("connected to %s, but no head signed by the service's key came within %g s on %s: this broker "
                  "may not be the ota-bridge service's (another broker on that port?), or the service does not "
                  "know device %s. Check --broker against the agent command the service prints at start-up")
_IGNORED_BECAUSE = {True: "the journal's result stands", False: "nothing is reported about it"}
# How often a head held back for its IssuedAt (agent without state) is looked at again.
TIME_RETRY_SECONDS = 30.0
# How often the key file (--server-key-file) is checked for a change.
KEY_FILE_CHECK_SECONDS = 1.0
SUBSCRIBE_SETTLE_SECONDS = 0.5
EVENT_QUEUE_SIZE = 1000
_POLL_SECONDS = 0.1
_STOP_SIGNALS = {SIGTERM: "SIGTERM", SIGINT: "SIGINT"}  # the agent stops cleanly on these
# Set for every command, on top of the agent's environment (minus its own OTA_AGENT_* settings).
COMMAND_ENV_DEVICE_ID = "OTA_DEVICE_ID"
COMMAND_ENV_JOB_ID = "OTA_JOB_ID"


# Events from the worker and download threads: records set once, like agent/link.py's.


class JobDone:
    """From the worker thread: the current command is done."""

    __slots__ = ("result",)

    def __init__(self, result: RunResult) -> None:
        self.result = result


class DownloadProgress:
    """From the download thread: how far the job's artifacts are."""

    __slots__ = ("job_id", "progress")

    def __init__(self, job_id: str, progress: Progress) -> None:
        self.job_id = job_id
        self.progress = progress


class DownloadDone:
    """From the download thread: the job's artifacts are in its directory (env), or cannot be (failure)."""

    __slots__ = ("job_id", "env", "failure")

    def __init__(self, job_id: str, env: dict[str, str], failure: tuple[JobStatus, str] | None = None) -> None:
        self.job_id = job_id
        self.env = env
        self.failure = failure


Event = Union[LinkEvent, JobDone, DownloadProgress, DownloadDone]


# --- the agent ------------------------------------------------------------------------------


class _Running:
    """The job in hand: its head, what runs it, how to wait for that; `canceling` once it was told to stop."""

    __slots__ = ("head", "runner", "wait", "canceling", "downloading")

    def __init__(self, head: Head, runner: Runner | JobDownload, wait: Callable[[float], object],
                 canceling: bool = False, downloading: bool = False) -> None:
        self.head = head
        self.runner = runner  # the command, or before it (downloading) the download of its artifacts
        self.wait = wait  # waits up to that many seconds for the runner's thread to be done with it
        self.canceling = canceling
        self.downloading = downloading


class Agent:
    """The main loop: reads events, keeps the latest head, runs one job at a time."""

    def __init__(self, settings: Settings, journal: Journal, environ: Mapping[str, str]) -> None:
        self.settings = settings
        self.journal = journal
        self.command_env = command_environment(environ, settings.device_id)
        self.events = EventQueue(EVENT_QUEUE_SIZE)  # of Events
        self.link = BrokerLink(settings, self.events)
        self.stop_signal: int | None = None
        self._head: Head | None = None  # the latest head received; None: the queue is empty
        self._head_new = False  # a head arrived that the loop has not acted on yet
        self._ready_at: float | None = None  # when heads may be acted on (None: not subscribed)
        self._running: _Running | None = None
        self._standby: Standby | None = None  # the next job's shell, started after the last job (runner.py)
        self._worker: Worker | None = None  # the thread that runs each command, from the first job on (agent/worker.py)
        self._unjournaled: set[tuple[str | None, int]] = set()  # (job, attempt)s the journal could not record
        self._connect_failures = 0
        self._checked: tuple[Head, str | None] | None = None  # the last head whose signature was checked
        self._retry_at: float | None = None  # when to look again at a head held back for its IssuedAt
        self._head_due: float | None = None  # subscribed, no signed head yet: when to warn about it
        self._heard_service = False  # a head signed by the service came since the last connect
        self.keys = TrustedKeys(settings, KEY_FILE_CHECK_SECONDS)
        self.cache = ArtifactCache(settings.journal_dir, settings.artifact_cache_size)

    def request_stop(self, signum: int, frame: Any = None) -> None:
        """Signal handler: only sets a flag, the main loop notices it."""
        self.stop_signal = signum

    def run(self) -> int:
        log.info("agent %s for device %s, broker %s, journal %s", agent_version(),
                 self.settings.device_id, self.settings.broker_url, self.journal.path)
        log.info("runs only jobs signed by the service key %s; %s", " or ".join(self.settings.server_keys_b64),
                 self.settings.policy.describe())
        self.stop_leftovers()
        self.link.start()
        try:
            while self.stop_signal is None:
                self._step()
        finally:
            self._shutdown()
        return 0

    def stop_leftovers(self) -> None:
        """End the commands a dead agent left running, before anything is run or reported.

        A journal entry "started" without a result names its command's process group; one that
        still runs (the same boot, the same leader: ProcessGroup.still_running) is killed like a
        canceled command, and the entry is marked so that its INTERRUPTED Reason says so.
        Without /proc no group is journalled, and a leftover command runs on.
        """
        for entry in self.journal.entries():
            if entry.result is None and entry.process is not None:
                self._stop_leftover(entry.job_id, entry.process, entry.attempt)

    def _stop_leftover(self, job_id: str, group: ProcessGroup, attempt: int) -> None:
        from .runner import stop_leftovers  # noqa: PLC0415 - lazily, see the imports at the top

        log.info("job %s: checking whether its command (process group %d) outlived the last agent",
                 job_id, group.pgid)
        if not stop_leftovers(group, self.settings.kill_grace):
            return
        log.warning("job %s: stopped the leftover processes of its command (process group %d), which "
                    "still ran after the agent restarted", job_id, group.pgid)
        try:
            self.journal.record_leftovers_stopped(job_id, attempt)
        except JournalError as e:
            log.error("job %s: %s", job_id, e)

    def _step(self) -> None:
        try:
            self._handle(self.events.get(timeout=_POLL_SECONDS))
            while True:  # take every event already waiting, so a burst of heads coalesces
                self._handle(self.events.get_nowait())
        except QueueEmpty:
            pass
        if self.keys.changed():
            self._on_keys_changed()
        self._warn_if_no_signed_head()
        self._act_on_head()

    def _on_keys_changed(self) -> None:
        self._checked = None
        log.info("the key file %s changed: now trusting %s", self.settings.server_key_file,
                 " and ".join(self.keys.b64))
        try:
            self.journal.rescope(self.keys.b64)
        except JournalError as e:
            log.error("%s", e)

    def _handle(self, event: Event) -> None:
        if isinstance(event, JobMessage):
            self._on_job_message(event)
        elif isinstance(event, JobDone):
            self._on_job_done(event.result)
        elif isinstance(event, DownloadProgress):
            self._on_download_progress(event)
        elif isinstance(event, DownloadDone):
            self._on_download_done(event)
        elif isinstance(event, Connected):
            self._on_connected(event)
        elif isinstance(event, Subscribed):
            self._on_subscribed(event)
        elif isinstance(event, ConnectFailed):
            self._connect_failures += 1
            log.warning("could not connect to %s (attempt %d: %s); retrying", self.settings.broker_url,
                        self._connect_failures, event.reason)
        elif isinstance(event, Disconnected):
            self._ready_at = self._head_due = None
            log.warning("disconnected from %s (%s); reconnecting", self.settings.broker_url, event.reason)

    # --- connection -------------------------------------------------------------------------

    def _on_connected(self, event: Connected) -> None:
        if event.refused:
            self._log_refusal(event)
            return
        self._connect_failures = 0
        self._ready_at, self._heard_service = None, False
        log.info("connected to %s", self.settings.broker_url)
        self.link.publish_presence(Presence.ONLINE)
        self.link.subscribe_job()

    def _log_refusal(self, event: Connected) -> None:
        """The broker's refusal; at the first of a run of credential refusals, what to do about it."""
        retry = f"; retrying in {event.retry_in:g} s" if event.retry_in is not None else ""
        log.error("broker %s refused the connection: %s%s", self.settings.broker_url, event.refused, retry)
        if event.bad_credentials and event.refusals == 1:
            log.error(CREDENTIALS_HINT, self.settings.username, self.settings.device_id)

    def _on_subscribed(self, event: Subscribed) -> None:
        if event.refused:
            log.error("broker refused the subscription to %s: %s", self.link.job_topic, event.refused)
            return
        log.info("subscribed to %s", self.link.job_topic)
        self._ready_at = time.monotonic() + SUBSCRIBE_SETTLE_SECONDS
        self._head_due = None if self._heard_service else time.monotonic() + self.settings.head_wait

    def _warn_if_no_signed_head(self) -> None:
        """The service keeps a signed head retained for every device it knows: none for a while after
        subscribing means another broker (anyone's, on the same port), or a device the service does
        not know. Said once per connection."""
        if self._head_due is None or time.monotonic() < self._head_due:
            return
        self._head_due = None
        log.warning(NO_SIGNED_HEAD, self.settings.broker_url, self.settings.head_wait, self.link.job_topic,
                    self.settings.device_id)

    def _on_job_message(self, event: JobMessage) -> None:
        if event.topic != self.link.job_topic:
            log.warning("ignored a message on unexpected topic %s", shown(event.topic))
            return
        from .head import parse_head  # noqa: PLC0415 - lazily, see the imports at the top

        try:
            head = parse_head(event.payload, self.settings.default_timeout)
        except MessageError as e:
            log.warning("ignored a bad message on %s: %s", event.topic, shown(str(e), cap=200))
            return
        self._head, self._head_new, self._retry_at = head, True, None
        if not self._heard_service and self._signature_problem(head) is None:
            self._heard_service, self._head_due = True, None  # the service's word: this is its broker

    # --- heads ------------------------------------------------------------------------------

    def _act_on_head(self) -> None:
        if self._retry_at is not None and time.monotonic() >= self._retry_at:
            self._retry_at, self._head_new = None, True  # a head held back for its IssuedAt: try again
        if not self._head_new or self._ready_at is None or time.monotonic() < self._ready_at:
            return
        if self._running is not None:
            self._supersede(self._running, self._head)
            return
        self._head_new = False
        if self._head is not None:
            self._take(self._head)

    def _supersede(self, running: _Running, head: Head | None) -> None:
        """A head arrived while a job runs: a duplicate is ignored, and so is one that cannot be
        the service's word after the running job (unsigned, forged, another device's, not newer);
        a newer job head, or an idle head whose Floor covers the running job, cancels it."""
        if head is None or (head.job_id, head.attempt) == (running.head.job_id, running.head.attempt):
            self._head_new = False  # the same head delivered again
            return
        if problem := self._why_not_next(head, running.head):
            log.warning("job %s: ignored %s while the command runs: %s", running.head.job_id, head.name, problem)
            self._head_new = False
            return
        if running.canceling:
            return  # the new head is taken once the canceled job is done
        running.canceling = True
        during = "its artifacts downloaded" if running.downloading else "the command ran"
        reason = (f"the job queue was cleared while {during}" if head.is_idle
                  else f"the head moved to job {head.job_id} while {during}")
        log.info("job %s: canceling: %s", running.head.job_id, reason)
        running.runner.cancel(reason)

    def _take(self, head: Head) -> None:
        """Run a new head, or resend what the journal knows about it, or reject it; an idle head
        only raises the Floor.

        Never run a job twice, nor one the service did not sign for this device, nor one at or
        below the Floor. A head that is not signed by the service never changes or resends what
        the journal holds.
        """
        if (head.job_id, head.attempt) in self._unjournaled:
            return
        entry = None if head.job_id is None else self.journal.get(head.job_id, head.attempt)
        unsigned = self._signature_problem(head)
        if unsigned is not None and (entry is not None or head.is_idle or unsigned == NO_ISSUE_TIME):
            log.warning("%s: ignored: %s; %s", head.name, unsigned, _IGNORED_BECAUSE[entry is not None])
        elif unsigned is not None:
            self._reject(head, unsigned, journal=False)
        elif entry is not None:
            self._resend(head, entry)
        elif head.device_id != self.settings.device_id:
            self._reject_or_ignore(head, f"the job is for device {head.device_id}")
        elif (late := self._too_old(head)) is not None:
            log.warning("%s: held back: %s; trying it again in %.0f s", head.name, late, TIME_RETRY_SECONDS)
            self._retry_at = time.monotonic() + TIME_RETRY_SECONDS
        elif self._record_floor(head, durable=head.is_idle) and not head.is_idle:
            reason = self._rejection(head)
            if reason is None and not head.artifacts:
                self._start(head)  # its journal write makes the Floor durable with the start
            elif not self._flush_floor(head):
                pass  # the Floor cannot be written: the head is not acted on
            elif reason is not None:
                self._reject(head, reason, journal=reason.startswith(OUTSIDE_POLICY))
            else:
                self._start_download(head)

    def _signature_problem(self, head: Head) -> str | None:
        """None when the service signed this head with a key this agent trusts; each head
        received is verified once (until the trusted keys change)."""
        if self._checked is None or self._checked[0] is not head:
            if head.signature is not None and head.issued_at is None:
                problem: str | None = NO_ISSUE_TIME
            else:
                problem = job_signature.signature_problem(head.signature, head.signed_content, self.keys.keys)
            self._checked = (head, problem)
        return self._checked[1]

    def _too_old(self, head: Head) -> str | None:
        """Why an agent without state (no Floor) must not act on this head yet; None when it may.

        With state, the Floor and the journal stop replays; without, only a head issued within
        HEAD_VALIDITY_SECONDS of this device's clock (either way) is taken.
        """
        if self.journal.floor is not None or head.issued_at is None:
            return None
        skew = (protocol.utc_now() - head.issued_at).total_seconds()
        if abs(skew) <= protocol.HEAD_VALIDITY_SECONDS:
            return None
        when = protocol.format_time(head.issued_at)
        if skew > 0:
            return (f"it was issued at {when}, more than {protocol.HEAD_VALIDITY_SECONDS} s ago, and this agent has "
                    "no state to tell a replay from a job still due (the service signs it again when the "
                    "device comes online)")
        return (f"it was issued at {when}, more than {protocol.HEAD_VALIDITY_SECONDS} s ahead of this device's "
                "clock: set the clock (NTP)")

    def _record_floor(self, head: Head, durable: bool = True) -> bool:
        """Raise the journal's Floor to a verified head's (durably, or for the next journal write
        to make durable before the head is acted on); False when that cannot be written."""
        try:
            if self.journal.raise_floor(head.floor, durable):
                log.log(self._floor_log_level(head.floor), "%s: the floor is now %d: no job at or below it ever "
                        "runs here", head.name, head.floor)
        except JournalError as e:
            log.error("%s: %s; not acted on", head.name, e)
            return False
        return True

    def _floor_log_level(self, floor: int) -> int:
        """INFO for a Floor that covers a job this agent never ran (the service canceled, deleted or
        ended it) or the first one; DEBUG for one that only follows the jobs it ran (after every job:
        its lines are a part of the agent's CPU per job, bench/profile_notes.md)."""
        highest = self.journal.highest_seq
        return logging.INFO if highest is None or floor > highest else logging.DEBUG

    def _flush_floor(self, head: Head) -> bool:
        """Write the Floor raised in memory; False (the head not acted on) when that fails."""
        try:
            self.journal.flush()
        except JournalError as e:
            log.error("%s: %s; not acted on", head.name, e)
            return False
        return True

    def _rejection(self, head: Head) -> str | None:
        """Why a head the service signed for this device must not run here; None when it may."""
        floor = self.journal.floor
        if floor is not None and head.seq is not None and head.seq <= floor:
            return BELOW_FLOOR
        highest = self.journal.highest_run  # (Seq, Attempt): a retry runs the same Seq again
        if highest is not None and head.seq is not None and (head.seq, head.attempt) < highest:
            return STALE
        if (refused := self.settings.policy.refusal(head.command)) is not None:
            return f"{OUTSIDE_POLICY}: {refused}"
        return None

    def _why_not_next(self, head: Head, running: Head) -> str | None:
        """Why a head cannot be the service's word after the running one; None when it can."""
        problem = self._signature_problem(head)
        if problem is None and head.device_id != self.settings.device_id:
            problem = f"the job is for device {head.device_id}"
        if problem is None and head.is_idle and (head.floor is None or running.seq is None
                                                 or head.floor < running.seq):
            problem = "its floor is below the running job: it is older than that job"
        if problem is None and not head.is_idle and (head.seq is None or running.seq is None
                                                     or (head.seq, head.attempt) <= (running.seq, running.attempt)):
            problem = "it is not newer than the running job"
        return problem

    def _reject_or_ignore(self, head: Head, reason: str) -> None:
        """An idle head has no job to report about: it is only logged."""
        if head.is_idle:
            log.warning("%s: ignored: %s", head.name, reason)
        else:
            self._reject(head, reason, journal=False)

    def _reject(self, head: Head, reason: str, journal: bool) -> None:
        """Report the head REJECTED; nothing runs.

        Only a refusal by the local policy is journalled (with the head's Seq): every other
        reason holds again whenever the head comes back, and journalling heads a forger or a
        replayer chose would let them push real entries out of the journal.
        """
        from .runner import RunResult  # noqa: PLC0415 - lazily, see the imports at the top

        log.warning("job %s: %s: %s%s", shown(head.job_id), JobStatus.REJECTED.value, reason, _about(head))
        message = _stamped(RunResult.without_output(head.job_id, JobStatus.REJECTED, protocol.utc_now(),
                                                    reason).status_message(), head)
        if journal:
            try:
                self.journal.record_result(head.job_id, message, seq=head.seq, attempt=head.attempt)
            except JournalError as e:
                log.error("job %s: %s; publishing the rejection anyway", head.job_id, e)
        self.link.publish_status(message)

    def _resend(self, head: Head, entry: Entry) -> None:
        from .runner import RunResult  # noqa: PLC0415 - lazily, see the imports at the top

        result = entry.result
        if result is None:
            result = _stamped(RunResult.interrupted(head.job_id, entry.start_datetime, head.success_on_restart,
                                                    entry.leftovers_stopped).status_message(), head)
            self._record_result(head, result)
        log.info("job %s: %s (resent from the journal)", head.job_id, result.get(Key.STATUS))
        self.link.publish_status(result)

    def _start(self, head: Head, artifact_env: Mapping[str, str] | None = None) -> None:
        from .runner import RunLimits, Runner, in_progress_message  # noqa: PLC0415 - lazily, see the imports at the top

        limits = RunLimits(timeout_seconds=head.timeout_seconds, output_cap=self.settings.output_cap,
                           kill_grace=self.settings.kill_grace)
        env = {**self.command_env, COMMAND_ENV_JOB_ID: head.job_id, **(artifact_env or {})}
        runner = Runner(head.job_id, head.command, limits, env)
        standby, self._standby = self._standby, None
        group = runner.spawn(standby)  # held at its gate: the start and its group go to disk in one write first
        try:
            self.journal.record_started(head.job_id, head.seq, runner.start_time, head.attempt, process=group)
        except JournalError as e:
            runner.discard()
            self._refuse(head, str(e))
            return
        if runner.took_standby:
            log.debug("job %s: runs in the shell started ahead of it", head.job_id)
        # One line, not two: a job's few log lines are a tenth of the agent's CPU per job (bench/profile_notes.md).
        log.info("job %s: %s%s%s", head.job_id, JobStatus.IN_PROGRESS.value,
                 "" if group is None else f"; its command runs as process group {group.pgid}", _about(head))
        self.link.publish_status(_stamped(in_progress_message(head.job_id, runner.start_time), head))
        runner.open_gate()  # the command runs now; the worker thread waits for it
        worker = self._worker or self._start_worker()
        self._running = _Running(head, runner, worker.wait_idle)
        worker.submit(runner)

    def _start_worker(self) -> Worker:
        from .worker import Worker  # noqa: PLC0415 - lazily, see the imports at the top

        self._worker = Worker(self._work, self.events.put, "commands")
        return self._worker

    def _refuse(self, head: Head, reason: str) -> None:
        """The journal cannot record the job, so it must not run: report FAILED instead."""
        from .runner import RunResult  # noqa: PLC0415 - lazily, see the imports at the top

        log.error("job %s: not run: %s", head.job_id, reason)
        self._unjournaled.add((head.job_id, head.attempt))
        result = RunResult.without_output(head.job_id, JobStatus.FAILED, protocol.utc_now(), reason)
        self.link.publish_status(_stamped(result.status_message(), head))
        if head.artifacts:
            self.cache.remove_job(head.job_id)

    def _work(self, runner: Runner) -> JobDone:
        """The worker thread: run the command; the Worker hands the result to the main loop."""
        try:
            result = runner.run()
        except Exception as e:  # a bug must not leave the job IN_PROGRESS forever
            from .runner import RunResult  # noqa: PLC0415 - lazily, see the imports at the top

            log.exception("job %s: the runner failed", runner.job_id)
            result = RunResult.without_output(
                runner.job_id, JobStatus.FAILED, runner.start_time, f"the agent failed to run the command: {e}")
        return JobDone(result)

    def _on_job_done(self, result: RunResult) -> None:
        if self._running is None or self._running.head.job_id != result.job_id:
            return
        head, self._running = self._running.head, None
        self._finish(head, result)

    def _finish(self, head: Head, result: RunResult) -> None:
        """Journal the job's result, drop its artifact directory and trim the cache, report the result."""
        message = _stamped(result.status_message(), head)
        self._record_result(head, message)
        if head.artifacts:
            self.cache.remove_job(result.job_id)
            self.cache.evict()
        log.info("job %s: %s exit=%s%s%s", result.job_id, result.status.value, result.exit_code,
                 f" ({result.reason})" if result.reason else "", _about(head))
        self.link.publish_status(message)
        if self._standby is None:  # the next job's shell, off the next job's path (see the module)
            from .runner import Standby  # noqa: PLC0415 - lazily, see the imports at the top

            self._standby = Standby.start(self.command_env, COMMAND_ENV_JOB_ID)

    def _drop_standby(self) -> None:
        if self._standby is not None:
            self._standby.discard()
            self._standby = None

    def _record_result(self, head: Head, message: dict[str, Any]) -> None:
        """Journal a result; the head's Seq counts for a job that never started (its download failed)."""
        try:
            self.journal.record_result(head.job_id, message, seq=head.seq, attempt=head.attempt)
        except JournalError as e:
            log.error("job %s: %s; publishing the result anyway", head.job_id, e)

    # --- artifacts --------------------------------------------------------------------------

    def _start_download(self, head: Head) -> None:
        """Fetch the job's artifacts on a thread of their own; the command starts once they are checked."""
        from .download import JobDownload  # noqa: PLC0415 - lazily, see the imports at the top

        download = JobDownload(head.job_id, head.artifacts, self.cache, ca_file=self.settings.ca_file,
                               on_progress=functools.partial(self._offer_progress, head.job_id))
        log.info("job %s: %s %d artifact(s), %d bytes%s", head.job_id, JobStatus.DOWNLOADING.value,
                 len(head.artifacts), sum(a.size for a in head.artifacts), _about(head))
        thread = threading.Thread(target=self._download, args=(download,), name=f"download-{head.job_id}",
                                  daemon=True)
        self._running = _Running(head, download, thread.join, downloading=True)
        thread.start()

    def _offer_progress(self, job_id: str, progress: Progress) -> None:
        """On the download thread: a progress report may be dropped when the loop is that far behind."""
        try:
            self.events.put_nowait(DownloadProgress(job_id, progress))
        except QueueFull:
            pass

    def _download(self, download: JobDownload) -> None:
        """The download thread: fetch, then link the files into the job's directory; tell the main loop."""
        from .download import DownloadCanceled, DownloadError, artifact_environment  # noqa: PLC0415 - lazily

        env: dict[str, str] = {}
        failure: tuple[JobStatus, str] | None = None
        try:
            download.run()
            env = artifact_environment(*self.cache.link_job(download.job_id, download.artifacts), download.artifacts)
        except DownloadCanceled as e:
            failure = (JobStatus.CANCELED, str(e))
        except DownloadError as e:
            failure = (JobStatus.FAILED, str(e))
        except Exception as e:  # a bug or a full disk must not leave the job DOWNLOADING forever
            log.exception("job %s: the download failed", download.job_id)
            failure = (JobStatus.FAILED, f"the agent could not fetch the artifacts or put them in the job's "
                                         f"directory: {e}")
        self.events.put(DownloadDone(download.job_id, env, failure))

    def _on_download_progress(self, event: DownloadProgress) -> None:
        from .download import progress_message  # noqa: PLC0415 - lazily, see the imports at the top

        running = self._running
        if running is not None and running.head.job_id == event.job_id and not running.canceling:
            self.link.publish_status(progress_message(event.job_id, event.progress, running.head.attempt))

    def _on_download_done(self, event: DownloadDone) -> None:
        running = self._running
        if running is None or running.head.job_id != event.job_id or not running.downloading:
            return
        self._running = None
        failure = event.failure
        if failure is None and running.canceling:  # the files came in as the head moved on
            failure = (JobStatus.CANCELED, running.runner.cancel_reason or "canceled")
        if failure is None:
            self._start(running.head, event.env)
            return
        from .runner import RunResult  # noqa: PLC0415 - lazily, see the imports at the top

        result = RunResult.without_output(event.job_id, failure[0], running.runner.start_time, failure[1])
        self._finish(running.head, result)

    # --- stopping ---------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Kill a running command (its journal entry stays "started"), say offline, disconnect."""
        if self.stop_signal is not None:
            log.info("stopping on %s", _STOP_SIGNALS.get(self.stop_signal, self.stop_signal))
        running = self._running
        if running is not None and running.downloading:
            log.info("job %s: stopping its download; after a restart it fetches on from what is on disk",
                     running.head.job_id)
            running.runner.cancel("the agent is stopping")
            running.wait(5)
        elif running is not None:
            log.info("job %s: killing it; after a restart it reports %s", running.head.job_id,
                     JobStatus.INTERRUPTED.value)
            running.runner.cancel("the agent is stopping")
            limits = running.runner.limits
            running.wait(limits.kill_grace + 2 * limits.pipe_grace + 5)
        self._drop_standby()
        self.link.stop()


def _stamped(message: dict[str, Any], head: Head) -> dict[str, Any]:
    """A status message about the head's attempt: it says which, from attempt 2 on (the service
    drops a report about another attempt than the job's current one)."""
    return {**message, Key.ATTEMPT: head.attempt} if head.attempt > 1 else message


def _about(head: Head) -> str:
    """What a person matches a job's log lines with: its parent job and name (unsigned labels),
    and the first line of its (signed) command."""
    lines = head.command.splitlines() or [""]
    more = f" (+{len(lines) - 1} more lines)" if len(lines) > 1 else ""
    labels = f"; {head.labels}" if head.labels else ""
    labels += f"; attempt {head.attempt}" if head.attempt > 1 else ""
    return f"{labels}; command {shown(lines[0], cap=200)}{more}"


def command_environment(environ: Mapping[str, str], device_id: str) -> dict[str, str]:
    """What commands see: the agent's environment without its settings (the password!), plus the device id."""
    env = {key: value for key, value in environ.items() if not key.startswith(ENV_PREFIX)}
    env[COMMAND_ENV_DEVICE_ID] = device_id
    return env


# --- entry point ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv, os.environ)
    except SettingsError as e:
        print(f"ota-agent: error: {e}", file=sys.stderr)
        return 2
    jsonlog.configure(settings.log_level, settings.log_format, sys.stderr, settings.device_id)
    jsonlog.skip_unused_fields()
    try:
        settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_private_dir(settings.state_dir)
        journal = Journal.open(settings.journal_dir, seq_scope=settings.server_keys_b64)
        agent = Agent(settings, journal, os.environ)
        agent.cache.open()
    except (OSError, UnsafeDirectory) as e:
        log.error("cannot use the state directory %s: %s", settings.journal_dir, e)
        return 1
    for signum in _STOP_SIGNALS:
        set_signal_handler(signum, agent.request_stop)
    return agent.run()
