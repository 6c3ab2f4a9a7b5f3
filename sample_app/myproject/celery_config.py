"""Celery settings chosen from the broker URL.

Plain functions without Django imports, so the broker-specific choices can be
unit tested; ``settings.py`` turns the result into ``CELERY_*`` settings.
"""

import collections
import os
import ssl
import threading
import time
from urllib.parse import urlsplit

import celery
import redis.sentinel
from celery import bootsteps
from celery.concurrency.thread import TaskPool as ThreadsPool
from kombu import Exchange, Queue
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.redis import SentinelChannel, SentinelTransport
from kombu.utils.json import dumps

# sentinel:// URLs name Redis Sentinels, which tell kombu where the current Redis primary is.
REDIS_SCHEMES = {"redis", "rediss", "sentinel"}
RABBITMQ_SCHEMES = {"amqp", "amqps", "pyamqp"}

DEFAULT_QUEUE = "celery"
QUEUE_NAMES = (DEFAULT_QUEUE, "email", "analytics", "priority")
TASK_ROUTES = {
    "users.tasks.send_welcome_email": {"queue": "email"},
    "analytics.tasks.track_event": {"queue": "analytics"},
    "analytics.tasks.priority_demo": {"queue": "priority"},
}

# Seconds. No task may run longer than TASK_TIME_LIMIT, and no ETA/countdown is
# further away than MAX_COUNTDOWN (the retry backoff cap of send_welcome_email).
TASK_TIME_LIMIT = 300
MAX_COUNTDOWN = 600
VISIBILITY_TIMEOUT = 3600
# Seconds between publish retries grow by 0.5 up to 1: about 25 s in all, within gunicorn's 30 s timeout.
# Long enough for a RabbitMQ restart, and for a Sentinel failover whose first election split (the
# redis role bounds it: redis_sentinel_down_after_ms + 2 * redis_sentinel_failover_timeout_ms).
PUBLISH_RETRY_POLICY = {"max_retries": 27, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}

# Seconds after a signup when a welcome email still not sent is enqueued again, and how
# often beat looks for such emails: longer than the publish retries and a normal delivery.
WELCOME_EMAIL_RESEND_AFTER = 120
WELCOME_EMAIL_RESEND_EVERY = 60
# Priorities 0-9. RabbitMQ delivers 9 first; Redis delivers 0 first.
MAX_PRIORITY = 9
DEFAULT_PRIORITY = 5

# Fanout, so messages arrive whatever routing key they are dead-lettered with,
# including when a server policy sets only the dead-letter exchange.
DEAD_LETTER_EXCHANGE = Exchange("celery.dlx", type="fanout")
DEAD_LETTER_QUEUE = "dead_letter"
# Redis has no dead-lettering: the workers keep each finally failed task in the list of that name
# instead, the newest this many (playbooks/dead_letters.yml lists and replays both brokers' alike).
REDIS_DEAD_LETTERS_KEPT = 1000
QUORUM_QUEUE_ARGUMENTS = {"x-queue-type": "quorum"}
# Seconds to connect to, and wait for, one Sentinel before asking the next: a Sentinel whose host
# is down must not stall finding the primary. Its answers are small and immediate.
SENTINEL_SOCKET_TIMEOUT = 2
# Seconds to connect to the primary the Sentinels named. One that lost power refuses nothing: without
# a bound, a connect made before the Sentinels elect another waits minutes for TCP to give up, and the
# publish with it, instead of asking them again.
PRIMARY_CONNECT_TIMEOUT = 2
# Milliseconds a publish waits for CELERY_REDIS_WAIT_REPLICAS replicas to confirm it. They answer
# the primary at once on a LAN; none answering within this is a failover's case, and the publish
# is tried again (PUBLISH_RETRY_POLICY) on the primary the Sentinels name then.
REDIS_WAIT_TIMEOUT_MS = 1000
# Seconds a publish to a Redis primary that failed waits before kombu sends it again. kombu sends it
# again through one reconnection only (Connection.ensure: the Redis transport does not say which
# errors are recoverable), at once: a failover's moment (READONLY, then NOREPLICAS until the new
# primary counts a replica) met twice refuses it.
REDIS_PUBLISH_RETRY_PAUSE = 0.5
# TLS to Redis (rediss://, or Sentinels that serve TLS): verify the server's certificate against the
# system's trust store, and its name; kombu otherwise falls back to CERT_NONE for rediss://.
REDIS_TLS = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}


class PromptAcks(bootsteps.StartStopStep):
    """A worker step: the event loop acknowledges a task as soon as a thread of the pool finishes
    it, not when the loop next wakes up.

    With late acks, a threads-pool worker hands each ack to its event loop (``hub.call_soon``),
    which does not wake the loop: it sleeps in ``poll()`` until a message, or a timer, comes.
    Once the worker holds its whole prefetch window, it runs nothing meanwhile (Celery issue
    6941): 4 threads ran a 50 ms task at 13/s instead of 80. A pipe in the loop, written to
    whenever another thread hands it work, ends the wait. Prefork workers are unaffected: their
    results already arrive through the loop.
    """

    requires = {"celery.worker.components:Hub"}

    def include_if(self, worker):
        return worker.use_eventloop

    def start(self, worker):
        # Open for the life of the process: an ack handed over while the worker stops still writes.
        self.read_fd, self.write_fd = os.pipe()
        for fd in (self.read_fd, self.write_fd):
            os.set_blocking(fd, False)
        hub, loop_thread = worker.hub, threading.get_ident()
        call_soon = hub.call_soon

        def call_soon_and_wake(callback, *args):
            promise = call_soon(callback, *args)
            if threading.get_ident() != loop_thread:
                try:
                    os.write(self.write_fd, b"\0")
                except BlockingIOError:  # the pipe is full: the loop is already awake
                    pass
            return promise

        hub.call_soon = call_soon_and_wake

    def register_with_event_loop(self, worker, hub):
        # Each time the loop starts: after a lost broker connection it was reset, readers and all.
        hub.add_reader(self.read_fd, self.drain)

    def drain(self):
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass


class PublishTaskEventsUnbuffered(bootsteps.StartStopStep):
    """A consumer step: a threads-pool worker sends each task event as it happens, unbuffered.

    With an event loop, Celery 5.6 buffers task events and sends them in batches. A pool thread
    can add an event while the loop sends the batch, and the batch's clearing drops it (Celery
    issue 10434, fixed in 5.7): Flower then shows the task RECEIVED for good (4-10 of 60 email
    tasks on the sandbox). Unbuffered events are published under the dispatcher's lock.
    """

    requires = {"celery.worker.consumer.events:Events"}

    def include_if(self, consumer):
        return celery.VERSION < (5, 7) and isinstance(consumer.pool, ThreadsPool)

    def start(self, consumer):
        # Each time the worker (re)connects: the Events step makes a new dispatcher then.
        consumer.event_dispatcher.buffer_group = frozenset()


class NotReplicated(redis.exceptions.ConnectionError):
    """Fewer replicas than asked confirmed a publish in time. A connection error, so that kombu asks
    the Sentinels for the primary again and publishes again, as after a lost connection."""


class MajoritySentinel(redis.sentinel.Sentinel):
    """redis-py's Sentinel client, following the primary most Sentinels name. redis-py takes the first
    Sentinel that answers, and one cut off from its peers keeps naming the primary cut off with it,
    which refuses writes (NOREPLICAS) once its replicas lag: its clients would go back to it until
    the partition heals. Sentinels that answered are asked first next time."""

    def discover_master(self, service_name):
        votes, answered = collections.Counter(), []
        for sentinel in list(self.sentinels):
            try:
                state = sentinel.sentinel_masters().get(service_name)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                continue
            answered.append(sentinel)
            if state and self.check_master_state(state, service_name):
                votes[(state["ip"], state["port"])] += 1
                if votes.most_common(1)[0][1] > len(self.sentinels) // 2:
                    break
        self.sentinels.sort(key=lambda sentinel: sentinel not in answered)
        if not votes:
            raise redis.sentinel.MasterNotFoundError(f"No master found for {service_name!r}")
        return votes.most_common(1)[0][0]


class MajoritySentinelChannel(SentinelChannel):
    """kombu's Sentinel channel, connecting to the primary most Sentinels name (MajoritySentinel)."""

    def _sentinel_managed_pool(self, asynchronous=False):
        pool = super()._sentinel_managed_pool(asynchronous)
        # kombu builds its Sentinel client inline, with no way to choose its class: the same client,
        # asking as MajoritySentinel asks.
        pool.sentinel_manager.__class__ = MajoritySentinel
        return pool


class ReplicatedSentinelChannel(MajoritySentinelChannel):
    """The channel above, whose publish, with the transport option ``wait_replicas``, counts only
    once that many replicas have it (Redis WAIT, sent with the LPUSH in one round trip). Replication
    is asynchronous: without it, a primary that loses power may take the last second's acknowledged
    publishes with it. A publish retried this way may reach the queue twice; the tasks are idempotent."""

    from_transport_options = (*SentinelChannel.from_transport_options, "wait_replicas")
    wait_replicas = 0

    def _put(self, queue, message, **kwargs):
        try:
            if not self.wait_replicas:
                return super()._put(queue, message, **kwargs)
            priority = self._get_message_priority(message, reverse=False)
            with self.conn_or_acquire() as client:
                pipe = client.pipeline(transaction=False)
                pipe.lpush(self._q_for_pri(queue, priority), dumps(message))
                pipe.execute_command("WAIT", self.wait_replicas, REDIS_WAIT_TIMEOUT_MS)
                _, replicas = pipe.execute()
        except redis.exceptions.RedisError:
            time.sleep(REDIS_PUBLISH_RETRY_PAUSE)
            raise
        # Not paused: WAIT took its second.
        if replicas < self.wait_replicas:
            raise NotReplicated(f"{replicas} of {self.wait_replicas} replicas confirmed the publish to {queue!r}")


class ReplicatedSentinelTransport(SentinelTransport):
    Channel = ReplicatedSentinelChannel


# The sentinel:// scheme names it, not the broker_transport setting: kombu takes the transport from
# the next URL's scheme when it fails over to it (Connection.switch), and would lose the setting.
# Without wait_replicas it publishes as kombu's own.
TRANSPORT_ALIASES["sentinel"] = lambda: ReplicatedSentinelTransport


def dead_letter_queue(quorum_queues=False):
    """Return the queue that the task queues dead-letter to, of the same type as they are.

    The rabbitmq role declares it with the same arguments; RabbitMQ refuses a redeclaration with others.
    """
    arguments = dict(QUORUM_QUEUE_ARGUMENTS) if quorum_queues else None
    return Queue(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, queue_arguments=arguments)


def redis_death_headers(queue, priority, exception, now):
    """The headers a finally failed task is kept with on Redis: RabbitMQ's ``x-death`` of a dead
    letter, so that one tool reads both, and the task's priority, which a replay gives back (the
    list holds every dead letter at one priority). The reason names the exception's type only:
    its message may quote the task's arguments; the worker's log has it."""
    death = {"queue": queue, "reason": f"failed: {type(exception).__name__}", "count": 1, "time": now.isoformat()}
    return {"x-death": [death], "x-priority": priority}


def broker_scheme(url):
    """Return the scheme of a broker URL, or of a ``;``-separated list of them (kombu fails over in turn).

    The settings follow the scheme, so every URL of a list must have the same one.
    """
    schemes = {urlsplit(part).scheme for part in url.split(";")}
    if len(schemes) > 1:
        raise ValueError(f"The broker URL list mixes the schemes {sorted(schemes)}: list one kind of broker")
    return schemes.pop()


def broker_name(url):
    """Return ``"redis"`` or ``"rabbitmq"`` for a broker URL (or a ``;``-separated list, see broker_scheme)."""
    scheme = broker_scheme(url)
    if scheme in REDIS_SCHEMES:
        return "redis"
    if scheme in RABBITMQ_SCHEMES:
        return "rabbitmq"
    raise ValueError(f"Unsupported broker URL scheme {scheme!r}: use redis(s)://, sentinel:// or amqp(s)://")


def sentinel_settings(env):
    """The ``sentinel`` argument of build_celery_config from the CELERY_REDIS_SENTINEL_* variables
    of ``env`` (a mapping: os.environ, or an environment file's), or None without a master name."""
    if not env.get("CELERY_REDIS_SENTINEL_MASTER"):
        if env.get("CELERY_REDIS_WAIT_REPLICAS", "0") not in {"", "0"}:
            raise ValueError("CELERY_REDIS_WAIT_REPLICAS needs Redis Sentinel: set CELERY_REDIS_SENTINEL_MASTER.")
        return None
    return {
        "master_name": env["CELERY_REDIS_SENTINEL_MASTER"],
        "username": env.get("CELERY_REDIS_SENTINEL_USER") or None,
        "password": env.get("CELERY_REDIS_SENTINEL_PASSWORD") or None,
        "tls": env.get("CELERY_REDIS_SENTINEL_TLS", "").strip().lower() in {"1", "true", "yes", "on"},
        "wait_replicas": int(env.get("CELERY_REDIS_WAIT_REPLICAS") or 0),
    }


def build_celery_config(
    broker_url, result_backend=None, quorum_queues=False, queue_names=QUEUE_NAMES, sentinel=None, rabbitmq_tls_name=None
):
    """Return Celery settings (lower-case names) suited to the broker in ``broker_url``.

    ``queue_names`` are the queues the app's workers consume (all of them unless hybrid mode moves some).
    ``sentinel`` is required by ``sentinel://`` broker and result backend URLs: ``{"master_name": ...,
    "username": ..., "password": ..., "tls": ...}``, the name the Sentinels monitor the Redis primary under,
    the account the app logs in to the Sentinels with (username and password may be None: no Sentinel auth),
    and whether the Sentinels and Redis servers serve TLS only (optional, default False), and how many
    replicas must have a publish before it counts (``wait_replicas``, optional, default 0: none).
    The user and password of the URLs are those of the Redis servers.
    ``rabbitmq_tls_name`` is the name every node of a RabbitMQ cluster's certificate carries, which
    a list of ``amqps://`` URLs needs (see _amqps_options); None checks each URL's own host.
    """
    config = {
        "broker_url": broker_url,
        "result_backend": result_backend,
        # Ack after the task finishes and requeue it if the worker process dies,
        # so a crash never loses a task (tasks are idempotent).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # With late acks, reserve one message per process so a slow worker doesn't sit on others' messages.
        "worker_prefetch_multiplier": 1,
        # Late-ack tasks are redelivered when the connection drops; stop the running copy so it doesn't run twice.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Keep publishing through a broker restart (about 10 s) instead of Celery's default 0.6 s of retries,
        # after which the signup's on_commit publish would log the error and the welcome email be lost.
        "task_publish_retry_policy": PUBLISH_RETRY_POLICY,
        # Keep retrying when the broker is not up yet as a worker starts (the default changes in Celery 6).
        "broker_connection_retry_on_startup": True,
        # Bound every task so the redelivery timeouts below hold.
        "task_time_limit": TASK_TIME_LIMIT,
        # Task events only while Flower watches: it turns the workers' on (enable_events every 5 s).
        # The "sent" event is a second publish per task, confirmed on RabbitMQ; Flower shows tasks
        # from "received" on without it. What each costs: bench/results.md.
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "task_default_queue": DEFAULT_QUEUE,
        "task_routes": TASK_ROUTES,
        "beat_schedule": {
            "resend-pending-welcome-emails": {
                "task": "users.tasks.resend_pending_welcome_emails",
                "schedule": WELCOME_EMAIL_RESEND_EVERY,
            },
        },
    }
    if broker_name(broker_url) == "redis":
        if quorum_queues:
            raise ValueError("Quorum queues are a RabbitMQ feature; turn CELERY_QUORUM_QUEUES off for Redis.")
        config.update(_redis_config(broker_url, queue_names))
    else:
        config.update(_rabbitmq_config(broker_url, quorum_queues, queue_names, rabbitmq_tls_name))
    for url, options in [
        (broker_url, "broker_transport_options"),
        (result_backend, "result_backend_transport_options"),
    ]:
        if url and broker_scheme(url) == "sentinel":
            config[options] = {**config.get(options, {}), **_sentinel_options(sentinel)}
    if broker_scheme(broker_url) == "sentinel":
        config["broker_transport_options"]["socket_connect_timeout"] = PRIMARY_CONNECT_TIMEOUT
        if wait_replicas := sentinel.get("wait_replicas"):
            config["broker_transport_options"]["wait_replicas"] = wait_replicas
    if result_backend and broker_scheme(result_backend) == "sentinel":
        config["redis_socket_connect_timeout"] = PRIMARY_CONNECT_TIMEOUT
    if (sentinel or {}).get("tls"):
        # TLS to the primary the Sentinels name (sentinel_kwargs covers the Sentinels themselves).
        if broker_scheme(broker_url) == "sentinel":
            config["broker_use_ssl"] = dict(REDIS_TLS)
        if result_backend and broker_scheme(result_backend) == "sentinel":
            config["redis_backend_use_ssl"] = dict(REDIS_TLS)
    return config


def build_hybrid_celery_config(broker_url, queue_names, result_backend=None, sentinel=None, rabbitmq_tls_name=None):
    """Return the settings of hybrid mode's second app, which serves ``queue_names`` on ``broker_url``."""
    if unknown := set(queue_names) - set(QUEUE_NAMES):
        raise ValueError(f"Unknown queues {sorted(unknown)} in CELERY_HYBRID_QUEUES; choose from {QUEUE_NAMES}.")
    # No quorum queues: Celery sets up their native delayed delivery on conf.broker_url, which the
    # CELERY_BROKER_URL environment variable (the main broker) overrides in every app.
    config = build_celery_config(
        broker_url, result_backend, queue_names=queue_names, sentinel=sentinel, rabbitmq_tls_name=rabbitmq_tls_name
    )
    # That variable wins over broker_url but not over these, which every connection of the app uses.
    config["broker_read_url"] = config["broker_write_url"] = broker_url
    return config


def _queues(queue_names, queue_arguments=None, exchange_type="topic"):
    return [
        Queue(name, Exchange(name, type=exchange_type), routing_key=name, queue_arguments=queue_arguments)
        for name in queue_names
    ]


def _sentinel_options(sentinel):
    if not (sentinel or {}).get("master_name"):
        raise ValueError("A sentinel:// URL needs the Sentinels' master name: set CELERY_REDIS_SENTINEL_MASTER.")
    credentials = {key: sentinel.get(key) for key in ("username", "password") if sentinel.get(key)}
    tls = {"ssl": True, **REDIS_TLS} if sentinel.get("tls") else {}
    return {
        # Read by kombu's SentinelChannel and Celery's SentinelBackend: the URLs' own user and
        # password go to the Redis primary only, so the Sentinels' login goes in sentinel_kwargs.
        "master_name": sentinel["master_name"],
        "sentinel_kwargs": {
            **credentials,
            **tls,
            "socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT,
            "socket_timeout": SENTINEL_SOCKET_TIMEOUT,
        },
    }


def _redis_config(broker_url, queue_names):
    config = {
        "broker_transport_options": {
            # Redis has no acks: a message not acked within this many seconds is delivered
            # again, so it must exceed the longest task and the furthest ETA/countdown.
            "visibility_timeout": VISIBILITY_TIMEOUT,
            # Redis has no native priorities: kombu keeps one list per step (0 is served first).
            "priority_steps": list(range(MAX_PRIORITY + 1)),
            # Drain higher-priority lists before lower ones instead of round-robin.
            "queue_order_strategy": "priority",
        },
        # The Redis result backend reads the same timeout.
        "result_backend_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT},
        # Unprioritised messages would land on step 0 (highest); put them in the middle instead.
        "task_default_priority": DEFAULT_PRIORITY,
        # Direct: Celery then sends to the queue itself (the anonymous exchange). Through a named
        # exchange kombu reads its bindings from Redis before every send (make bench: the kit
        # sent its tasks at half the defaults' rate with topic exchanges).
        "task_queues": _queues(queue_names, exchange_type="direct"),
    }
    if broker_scheme(broker_url) == "rediss":
        config["broker_use_ssl"] = dict(REDIS_TLS)
    return config


def _amqps_options(broker_url, server_name=None):
    """TLS options of amqps:// URLs: py-amqp verifies the broker's certificate against the system's
    trust store, and that it names ``server_name``, or with None the URL's host (kombu fills it in).

    kombu (5.6) writes that host into these options in place, so after failing over to another
    node it would check the first node's name: a list of amqps:// URLs needs a name that every
    node's certificate carries (the cluster's), else it is refused.
    """
    if ";" in broker_url and not server_name:
        raise ValueError(
            "A list of amqps:// URLs cannot fail over with each node's name checked (kombu keeps the first "
            "node's): set CELERY_RABBITMQ_TLS_NAME to a name every node's certificate carries, or give one URL"
        )
    return {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": server_name}


def _rabbitmq_config(broker_url, quorum_queues, queue_names, tls_name=None):
    queue_arguments = {
        # Messages that are rejected, expire or exceed a delivery limit go to celery.dlx -> dead_letter.
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE.name,
    }
    config = {
        # Wait for RabbitMQ to confirm each publish, so a message is never silently lost.
        "broker_transport_options": {"confirm_publish": True},
        # Notice dead TCP connections within a minute (two missed heartbeats) instead of hanging.
        "broker_heartbeat": 30,
        # Reject instead of ack tasks that finally fail, so RabbitMQ dead-letters them.
        "task_acks_on_failure_or_timeout": False,
    }
    if quorum_queues:
        # Replicated, durable queues. They reject x-max-priority, so this mode has no priorities.
        queue_arguments.update(QUORUM_QUEUE_ARGUMENTS)
        # The default queue when task_queues is empty, and the queues Celery declares on the fly
        # (e.g. worker -Q other), are quorum too; the dead-letter step reads the former.
        config["task_default_queue_type"] = config["task_create_missing_queue_type"] = "quorum"
    else:
        # Classic queues need x-max-priority to honour message priorities.
        queue_arguments["x-max-priority"] = MAX_PRIORITY
        # Unprioritised messages would be treated as 0 (lowest); put them in the middle instead.
        config["task_default_priority"] = DEFAULT_PRIORITY
    # Topic exchanges because Celery's native delayed delivery (ETA/countdown on
    # quorum queues) cannot route through direct exchanges.
    config["task_queues"] = _queues(queue_names, queue_arguments)
    if broker_scheme(broker_url) == "amqps":
        config["broker_use_ssl"] = _amqps_options(broker_url, tls_name)
    return config
