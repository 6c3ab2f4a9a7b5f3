import contextlib
import os
import ssl
import threading
from types import SimpleNamespace
from unittest import mock

import celery
import pytest
import redis.sentinel
from celery import Celery
from celery.app.task import Context
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.concurrency.thread import TaskPool as ThreadsPool
from celery.events import EventDispatcher
from kombu import Connection, Queue
from kombu.asynchronous import Hub
from kombu.transport.redis import SentinelChannel

from myproject.celery import DeclareDeadLetterQueue, app, keep_failed_task_on_redis
from myproject.celery_config import (
    DEAD_LETTER_QUEUE,
    MAX_COUNTDOWN,
    PRIMARY_CONNECT_TIMEOUT,
    QUEUE_NAMES,
    REDIS_DEAD_LETTERS_KEPT,
    REDIS_PUBLISH_RETRY_PAUSE,
    REDIS_WAIT_TIMEOUT_MS,
    SENTINEL_SOCKET_TIMEOUT,
    TASK_TIME_LIMIT,
    VISIBILITY_TIMEOUT,
    MajoritySentinel,
    NotReplicated,
    PromptAcks,
    PublishTaskEventsUnbuffered,
    ReplicatedSentinelChannel,
    ReplicatedSentinelTransport,
    broker_name,
    build_celery_config,
    build_hybrid_celery_config,
    dead_letter_queue,
    sentinel_settings,
)
from users.tasks import send_welcome_email

REDIS_URL = "redis://127.0.0.1:6379/0"
RABBITMQ_URL = "amqp://app:secret@127.0.0.1:5672/app"
# What playbooks/vars/app_settings.yml builds for three hosts.
RABBITMQ_URLS = ";".join(f"amqp://app:secret@10.0.0.{host}:5672/app" for host in (1, 2, 3))
SENTINEL_URLS = ";".join(f"sentinel://celery:secret@10.0.0.{host}:26379/0" for host in (1, 2, 3))
SENTINEL = {"master_name": "celery", "username": "celery-sentinel", "password": "sentinel-secret"}
SENTINEL_OPTIONS = {
    "master_name": "celery",
    "sentinel_kwargs": {
        "username": "celery-sentinel",
        "password": "sentinel-secret",
        "socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT,
        "socket_timeout": SENTINEL_SOCKET_TIMEOUT,
    },
}


def queue_arguments(config):
    return {queue.name: queue.queue_arguments for queue in config["task_queues"]}


@pytest.mark.parametrize(
    ("url", "name"),
    [
        (REDIS_URL, "redis"),
        ("rediss://:pw@redis.internal:6380/1", "redis"),
        (RABBITMQ_URL, "rabbitmq"),
        ("amqps://app:pw@rabbit.internal:5671/app", "rabbitmq"),
        (SENTINEL_URLS, "redis"),
        (RABBITMQ_URLS, "rabbitmq"),
    ],
)
def test_broker_name(url, name):
    assert broker_name(url) == name


def test_unknown_broker_scheme_is_rejected():
    with pytest.raises(ValueError, match="sqs"):
        build_celery_config("sqs://")


@pytest.mark.parametrize("urls", [f"{REDIS_URL};{RABBITMQ_URL}", f"{SENTINEL_URLS};{REDIS_URL}"])
def test_url_lists_mixing_schemes_are_rejected(urls):
    with pytest.raises(ValueError, match="mixes the schemes"):
        broker_name(urls)
    with pytest.raises(ValueError, match="mixes the schemes"):
        build_celery_config(urls)


@pytest.mark.parametrize("url", [REDIS_URL, RABBITMQ_URL])
def test_common_reliability_settings(url):
    config = build_celery_config(url, result_backend="redis://127.0.0.1:6379/1")
    assert config["broker_url"] == url
    assert config["result_backend"] == "redis://127.0.0.1:6379/1"
    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert config["broker_connection_retry_on_startup"] is True
    assert config["task_publish_retry_policy"]["max_retries"] >= 25
    assert (
        config["beat_schedule"]["resend-pending-welcome-emails"]["task"] == "users.tasks.resend_pending_welcome_emails"
    )
    assert config["task_default_queue"] == "celery"
    assert sorted(queue.name for queue in config["task_queues"]) == sorted(QUEUE_NAMES)


def test_redis_settings():
    config = build_celery_config(REDIS_URL)
    transport = config["broker_transport_options"]
    assert transport["visibility_timeout"] == VISIBILITY_TIMEOUT
    assert config["result_backend_transport_options"]["visibility_timeout"] == VISIBILITY_TIMEOUT
    assert transport["priority_steps"] == list(range(10))
    assert transport["queue_order_strategy"] == "priority"
    assert "confirm_publish" not in transport
    assert "broker_heartbeat" not in config
    assert "broker_use_ssl" not in config
    assert set(queue_arguments(config).values()) == {None}


def test_redis_tasks_go_straight_to_their_queue(monkeypatch):
    """Through a named exchange kombu's Redis transport reads the exchange's bindings (SMEMBERS)
    before every send; the kit's direct queues let Celery send on the anonymous exchange."""
    sent = []
    monkeypatch.setattr("kombu.Producer.publish", lambda producer, body, **options: sent.append(options))
    redis_app = Celery("redis-routing", broker="memory://", set_as_current=False)
    redis_app.conf.update({key: value for key, value in build_celery_config(REDIS_URL).items() if key != "broker_url"})
    redis_app.send_task("users.tasks.send_welcome_email", ("someone@example.com",), queue="email")
    assert (sent[0]["exchange"], sent[0]["routing_key"]) == ("", "email")


def test_visibility_timeout_outlasts_tasks_and_countdowns():
    assert VISIBILITY_TIMEOUT > TASK_TIME_LIMIT + MAX_COUNTDOWN
    assert send_welcome_email.retry_backoff_max <= MAX_COUNTDOWN


def test_rediss_verifies_certificates():
    config = build_celery_config("rediss://:pw@redis.internal:6380/0")
    assert config["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}


def test_amqps_verifies_the_certificate_and_the_brokers_name():
    config = build_celery_config("amqps://app:pw@10.0.0.5:5671/app")
    assert config["broker_use_ssl"] == {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None}
    assert "broker_use_ssl" not in build_celery_config(RABBITMQ_URL)


AMQPS_CLUSTER = "amqps://app:pw@10.0.0.5:5671/app;amqps://app:pw@10.0.0.6:5671/app"


def test_a_list_of_amqps_urls_needs_the_clusters_name():
    with pytest.raises(ValueError, match="CELERY_RABBITMQ_TLS_NAME"):
        build_celery_config(AMQPS_CLUSTER)


def server_names_checked(urls, ssl_options, monkeypatch):
    """The name py-amqp is told to check on each node of the list, as kombu fails over through them."""
    from kombu.transport import pyamqp

    checked = []

    class Refused(pyamqp.Connection):
        def __init__(self, **options):
            checked.append(options["ssl"]["server_hostname"])
            raise OSError("refused")

    monkeypatch.setattr(pyamqp.Transport, "Connection", Refused)
    connection = Connection(urls, ssl=ssl_options)
    for _ in urls.split(";"):
        with pytest.raises(OSError):
            connection.transport.establish_connection()
        connection.maybe_switch_next()
    return checked


def test_a_list_of_amqps_urls_checks_the_clusters_name_on_every_node(monkeypatch):
    config = build_celery_config(AMQPS_CLUSTER, rabbitmq_tls_name="rabbitmq.internal")
    assert config["broker_use_ssl"] == {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": "rabbitmq.internal"}
    assert server_names_checked(AMQPS_CLUSTER, config["broker_use_ssl"], monkeypatch) == ["rabbitmq.internal"] * 2
    # Why a list needs it: with None, kombu keeps the first node's name for the second.
    unnamed = {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None}
    assert server_names_checked(AMQPS_CLUSTER, unnamed, monkeypatch) == ["10.0.0.5"] * 2


def test_rabbitmq_settings_classic_queues():
    config = build_celery_config(RABBITMQ_URL)
    assert config["broker_transport_options"] == {"confirm_publish": True}
    assert config["broker_heartbeat"] > 0
    assert config["task_acks_on_failure_or_timeout"] is False
    assert config["task_default_priority"] == 5
    assert "visibility_timeout" not in config["broker_transport_options"]
    for arguments in queue_arguments(config).values():
        assert arguments == {"x-dead-letter-exchange": "celery.dlx", "x-max-priority": 9}
    assert "dead_letter" not in queue_arguments(config)  # workers must not consume dead letters


def test_rabbitmq_quorum_queues_drop_priorities():
    config = build_celery_config(RABBITMQ_URL, quorum_queues=True)
    for arguments in queue_arguments(config).values():
        assert arguments == {"x-dead-letter-exchange": "celery.dlx", "x-queue-type": "quorum"}
    assert config["task_default_queue_type"] == "quorum"
    assert "task_default_priority" not in config
    # Native delayed delivery (ETA and retries on quorum queues) needs non-direct exchanges.
    assert {queue.exchange.type for queue in config["task_queues"]} == {"topic"}


def test_rabbitmq_url_list_with_quorum_queues():
    config = build_celery_config(RABBITMQ_URLS, quorum_queues=True)
    assert config["broker_url"] == RABBITMQ_URLS  # kombu fails over through the list in turn
    for arguments in queue_arguments(config).values():
        assert "x-max-priority" not in arguments
        assert arguments["x-queue-type"] == "quorum"
    assert config["task_default_queue_type"] == config["task_create_missing_queue_type"] == "quorum"


@pytest.mark.parametrize(("quorum_queues", "arguments"), [(False, None), (True, {"x-queue-type": "quorum"})])
def test_dead_letter_queue_has_the_task_queues_type(quorum_queues, arguments):
    queue = dead_letter_queue(quorum_queues)
    assert (queue.name, queue.exchange.name, queue.exchange.type) == ("dead_letter", "celery.dlx", "fanout")
    assert queue.queue_arguments == arguments


def test_sentinel_transport_options():
    config = build_celery_config(SENTINEL_URLS, result_backend=SENTINEL_URLS.replace("/0", "/1"), sentinel=SENTINEL)
    transport = config["broker_transport_options"]
    assert transport == {**transport, **SENTINEL_OPTIONS}
    # The Redis options stay.
    assert transport["visibility_timeout"] == VISIBILITY_TIMEOUT
    assert transport["priority_steps"] == list(range(10))
    assert config["result_backend_transport_options"] == {"visibility_timeout": VISIBILITY_TIMEOUT, **SENTINEL_OPTIONS}
    assert "broker_use_ssl" not in config
    # A primary that lost power is given up on in seconds, and the Sentinels asked again.
    assert transport["socket_connect_timeout"] == config["redis_socket_connect_timeout"] == PRIMARY_CONNECT_TIMEOUT


def test_sentinel_result_backend_with_rabbitmq_broker():
    config = build_celery_config(RABBITMQ_URL, result_backend=SENTINEL_URLS, sentinel=SENTINEL)
    assert config["broker_transport_options"] == {"confirm_publish": True}
    assert config["result_backend_transport_options"] == SENTINEL_OPTIONS
    hybrid = build_hybrid_celery_config(RABBITMQ_URL, ["analytics"], result_backend=SENTINEL_URLS, sentinel=SENTINEL)
    assert hybrid["result_backend_transport_options"] == SENTINEL_OPTIONS


def test_sentinel_without_auth_sends_no_credentials():
    config = build_celery_config(SENTINEL_URLS, sentinel={"master_name": "celery", "username": None, "password": None})
    assert set(config["broker_transport_options"]["sentinel_kwargs"]) == {"socket_connect_timeout", "socket_timeout"}


@pytest.mark.parametrize("sentinel", [None, {"master_name": "", "username": "u", "password": "p"}])
def test_sentinel_url_needs_a_master_name(sentinel):
    with pytest.raises(ValueError, match="CELERY_REDIS_SENTINEL_MASTER"):
        build_celery_config(SENTINEL_URLS, sentinel=sentinel)
    with pytest.raises(ValueError, match="CELERY_REDIS_SENTINEL_MASTER"):
        build_celery_config(REDIS_URL, result_backend=SENTINEL_URLS, sentinel=sentinel)


def test_plain_redis_ignores_sentinel_settings():
    assert build_celery_config(REDIS_URL, sentinel=SENTINEL) == build_celery_config(REDIS_URL)


def test_quorum_queues_are_rejected_for_redis():
    with pytest.raises(ValueError, match="RabbitMQ"):
        build_celery_config(REDIS_URL, quorum_queues=True)


@pytest.mark.parametrize(
    ("task_name", "queue"),
    [
        ("users.tasks.send_welcome_email", "email"),
        ("analytics.tasks.track_event", "analytics"),
        ("analytics.tasks.priority_demo", "priority"),
        ("some.other.task", "celery"),
    ],
)
def test_routing_maps_task_names_to_queues(task_name, queue):
    assert app.amqp.router.route({}, task_name)["queue"].name == queue


def test_routed_tasks_are_registered():
    app.loader.import_default_modules()
    assert {"users.tasks.send_welcome_email", "analytics.tasks.track_event", "analytics.tasks.priority_demo"} <= set(
        app.tasks
    )


def test_dead_letter_step_only_runs_on_rabbitmq():
    step = DeclareDeadLetterQueue(parent=None)
    for url, included in [(RABBITMQ_URL, True), (REDIS_URL, False)]:
        consumer = SimpleNamespace(app=SimpleNamespace(conf=SimpleNamespace(broker_read_url=url)))
        assert step.include_if(consumer) is included


def dead_letter_step_consumer(connection, config):
    consumer_app = Celery(set_as_current=False)  # Celery's defaults under the settings
    consumer_app.conf.update(config)
    return SimpleNamespace(connection=connection, app=consumer_app)


def test_dead_letter_step_declares_exchange_and_queue():
    config = build_celery_config(RABBITMQ_URL)
    with Connection("memory://") as connection:
        DeclareDeadLetterQueue(parent=None).start(dead_letter_step_consumer(connection, config))
        channel = connection.default_channel
        channel.queue_declare("dead_letter", passive=True)  # raises if missing
        channel.basic_publish(channel.prepare_message("dead"), exchange="celery.dlx", routing_key="email")
        assert channel.basic_get("dead_letter").body == b"dead"


@pytest.mark.parametrize("quorum_queues", [False, True])
def test_dead_letter_step_declares_the_queue_type_of_the_settings(quorum_queues, monkeypatch):
    declared = []
    monkeypatch.setattr(Queue, "declare", lambda queue, *args, **kwargs: declared.append(queue.queue_arguments))
    config = build_celery_config(RABBITMQ_URL, quorum_queues=quorum_queues)
    with Connection("memory://") as connection:
        DeclareDeadLetterQueue(parent=None).start(dead_letter_step_consumer(connection, config))
    assert declared == [dead_letter_queue(quorum_queues).queue_arguments]


def test_sentinel_tls_verifies_the_sentinels_and_the_primary():
    config = build_celery_config(
        SENTINEL_URLS, result_backend=SENTINEL_URLS.replace("/0", "/1"), sentinel={**SENTINEL, "tls": True}
    )
    for options in ("broker_transport_options", "result_backend_transport_options"):
        kwargs = config[options]["sentinel_kwargs"]
        assert (kwargs["ssl"], kwargs["ssl_cert_reqs"], kwargs["ssl_check_hostname"]) == (True, ssl.CERT_REQUIRED, True)
    verified = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    assert config["broker_use_ssl"] == config["redis_backend_use_ssl"] == verified
    # A RabbitMQ broker beside a Sentinel result backend keeps its own TLS settings.
    assert "broker_use_ssl" not in build_celery_config(
        RABBITMQ_URL, result_backend=SENTINEL_URLS, sentinel={**SENTINEL, "tls": True}
    )


def test_sentinel_settings_from_an_environment():
    assert sentinel_settings({"CELERY_REDIS_SENTINEL_MASTER": ""}) is None
    env = {
        "CELERY_REDIS_SENTINEL_MASTER": "celery",
        "CELERY_REDIS_SENTINEL_USER": "celery-sentinel",
        "CELERY_REDIS_SENTINEL_PASSWORD": "sentinel-secret",
        "CELERY_REDIS_SENTINEL_TLS": "true",
    }
    assert sentinel_settings(env) == {**SENTINEL, "tls": True, "wait_replicas": 0}
    assert sentinel_settings({**env, "CELERY_REDIS_SENTINEL_TLS": ""})["tls"] is False
    assert sentinel_settings({**env, "CELERY_REDIS_WAIT_REPLICAS": "1"})["wait_replicas"] == 1
    with pytest.raises(ValueError, match="CELERY_REDIS_WAIT_REPLICAS needs Redis Sentinel"):
        sentinel_settings({"CELERY_REDIS_WAIT_REPLICAS": "1"})


def test_without_wait_replicas_no_publish_waits():
    config = build_celery_config(SENTINEL_URLS, sentinel={**SENTINEL, "wait_replicas": 0})
    assert "wait_replicas" not in config["broker_transport_options"]


def test_wait_replicas_publishes_through_the_replicated_sentinel_channel_after_a_failover_too():
    config = build_celery_config(SENTINEL_URLS, sentinel={**SENTINEL, "wait_replicas": 2})
    app = Celery(set_as_current=False)
    app.config_from_object(config)
    connection = app.connection_for_write()
    # What Celery connects with: the channel class, and the option it reads (no connection made);
    # the same after kombu fails over to the next URL, which it parses anew.
    for _url in SENTINEL_URLS.split(";"):
        assert connection.transport.Channel is ReplicatedSentinelChannel
        assert connection.transport_options["wait_replicas"] == 2
        connection.maybe_switch_next()


class FakePipeline:
    def __init__(self, replicas):
        self.replicas, self.commands = replicas, []

    def lpush(self, key, value):
        self.commands.append(("LPUSH", key, value))

    def execute_command(self, *command):
        self.commands.append(command)

    def execute(self):
        if isinstance(self.replicas, Exception):
            raise self.replicas
        return [1, self.replicas]


def put_through_replicated_channel(replicas, wait_replicas=1):
    """ReplicatedSentinelChannel._put on a client whose WAIT answers ``replicas``; returns the commands
    it sent, in one round trip (one pipeline, not a transaction), or raises."""
    pipeline = FakePipeline(replicas)
    client = SimpleNamespace(pipeline=lambda transaction: transaction is False and pipeline)
    # A channel with no connection: what _put reads of it, set on the instance.
    channel = object.__new__(ReplicatedSentinelChannel)
    vars(channel).update(
        wait_replicas=wait_replicas,
        _get_message_priority=lambda message, reverse: 5,
        _q_for_pri=lambda queue, priority: f"{queue}\x06\x16{priority}",
        conn_or_acquire=lambda: contextlib.nullcontext(client),
    )
    channel._put("celery", {"body": "task"})
    return pipeline.commands


def test_a_publish_counts_once_the_replicas_confirm_it():
    commands = put_through_replicated_channel(replicas=1)
    assert commands == [("LPUSH", "celery\x06\x165", '{"body": "task"}'), ("WAIT", 1, REDIS_WAIT_TIMEOUT_MS)]
    assert put_through_replicated_channel(replicas=2, wait_replicas=2)


def test_without_wait_replicas_a_publish_is_kombus_own(monkeypatch):
    puts = []
    monkeypatch.setattr(SentinelChannel, "_put", lambda channel, queue, message, **kwargs: puts.append(queue))
    assert put_through_replicated_channel(replicas=0, wait_replicas=0) == []
    assert puts == ["celery"]


def test_a_publish_fewer_replicas_confirmed_is_a_connection_error_kombu_retries():
    with pytest.raises(NotReplicated, match="0 of 1 replicas") as error:
        put_through_replicated_channel(replicas=0)
    # Retried by kombu's ensure() (the publish retry policy) as a lost connection is.
    connection = Connection(SENTINEL_URLS, transport=ReplicatedSentinelTransport)
    assert isinstance(error.value, connection.recoverable_connection_errors)


def test_a_publish_the_primary_failed_is_given_back_to_kombu_after_a_pause(monkeypatch):
    # kombu sends it again at once, and only once after reconnecting: a second moment to the failover.
    pauses = []
    monkeypatch.setattr("myproject.celery_config.time.sleep", pauses.append)
    for error in (redis.exceptions.ConnectionError("closed"), redis.exceptions.ResponseError("NOREPLICAS")):
        with pytest.raises(type(error)):
            put_through_replicated_channel(replicas=error)
    # Also kombu's own publish, without WAIT.
    monkeypatch.setattr(SentinelChannel, "_put", mock.Mock(side_effect=redis.exceptions.ReadOnlyError("READONLY")))
    with pytest.raises(redis.exceptions.ReadOnlyError):
        put_through_replicated_channel(replicas=1, wait_replicas=0)
    assert pauses == [REDIS_PUBLISH_RETRY_PAUSE] * 3
    # WAIT's timeout is the pause of a publish too few replicas confirmed.
    with pytest.raises(NotReplicated):
        put_through_replicated_channel(replicas=0)
    assert len(pauses) == 3


def test_prompt_acks_wakes_the_event_loop_when_a_pool_thread_hands_it_work():
    hub = Hub()
    worker = SimpleNamespace(hub=hub, use_eventloop=True)
    step = PromptAcks(worker)
    step.start(worker)
    acks = []
    try:
        # The second time after a reset, as the worker's loop starts again after a lost broker connection.
        for _ in range(2):
            step.register_with_event_loop(worker, hub)
            hub.call_soon(acks.append, "from the loop's thread")  # it is awake: no need to wake it
            assert not hub.poller.poll(0)
            pool_thread = threading.Thread(target=hub.call_soon, args=(acks.append, "from a pool thread"))
            pool_thread.start()
            pool_thread.join()
            assert [fd for fd, _ in hub.poller.poll(0) or ()] == [step.read_fd], "poll() would sleep on"
            step.drain()
            assert not hub.poller.poll(0)
            hub.reset()
        assert sorted(acks) == sorted(["from the loop's thread", "from a pool thread"] * 2)  # reset ran them
    finally:
        hub.close()
        os.close(step.read_fd)
        os.close(step.write_fd)


def test_a_threads_pool_worker_sends_task_events_unbuffered():
    """Celery 5.6's buffered task events lose some from pool threads (issue 10434): the step turns the buffer off."""

    def consumer(pool):
        dispatcher = EventDispatcher(enabled=False, buffer_group=["task"])
        return SimpleNamespace(pool=pool, event_dispatcher=dispatcher)

    step = PublishTaskEventsUnbuffered(consumer(None))
    threads, prefork = consumer(ThreadsPool(limit=1)), consumer(PreforkPool(limit=1))
    assert step.include_if(threads) is (celery.VERSION < (5, 7))
    assert not step.include_if(prefork), "prefork sends its events from the loop's thread: keep batching them"
    step.start(threads)
    assert not threads.event_dispatcher.buffer_group


class RecordingProducer:
    """What keep_failed_task_on_redis sends through the app's producer."""

    def __init__(self):
        self.published, self.trimmed = [], []
        self.channel = SimpleNamespace(client=SimpleNamespace(ltrim=lambda *args: self.trimmed.append(args)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def publish(self, body, **options):
        self.published.append((body, options))


def failed_task(broker_url, producer, is_eager=False, delivery_info=None):
    request = Context(is_eager=is_eager, delivery_info=delivery_info)
    task_app = SimpleNamespace(
        conf=SimpleNamespace(broker_read_url=broker_url, task_publish_retry_policy={}),
        amqp=app.amqp,
        producer_or_acquire=lambda: producer,
    )
    return SimpleNamespace(app=task_app, request=request, name="analytics.tasks.track_event", serializer="json")


def test_a_task_that_finally_failed_on_redis_is_kept_in_the_bounded_dead_letter_list():
    producer = RecordingProducer()
    error = ValueError("the token abc123 was refused")
    sender = failed_task(REDIS_URL, producer, delivery_info={"routing_key": "analytics", "priority": 7})
    keep_failed_task_on_redis(sender, "id-1", error, ("e-1", "signup"), {"plan": "pro"})
    ((body, options),) = producer.published
    args, kwargs, _embed = body
    assert (args, kwargs) == (("e-1", "signup"), {"plan": "pro"})
    assert (options["exchange"], options["routing_key"], options["priority"]) == ("", DEAD_LETTER_QUEUE, 0)
    headers = options["headers"]
    assert (headers["id"], headers["task"], headers["x-priority"]) == ("id-1", "analytics.tasks.track_event", 7)
    (death,) = headers["x-death"]
    # Where it died and why, without the exception's message (it may quote arguments).
    assert (death["queue"], death["reason"], death["count"]) == ("analytics", "failed: ValueError", 1)
    assert producer.trimmed == [(DEAD_LETTER_QUEUE, 0, REDIS_DEAD_LETTERS_KEPT - 1)]


def test_a_failure_the_main_process_reports_is_kept_on_the_task_s_routed_queue():
    """A hard time limit: the worker's main process sends task_failure with an empty request."""
    producer = RecordingProducer()
    keep_failed_task_on_redis(failed_task(REDIS_URL, producer), "id-1", TimeoutError(), ("e-1", "signup"), {})
    ((_body, options),) = producer.published
    (death,) = options["headers"]["x-death"]
    assert (death["queue"], death["reason"]) == ("analytics", "failed: TimeoutError")


@pytest.mark.parametrize("broker_url, is_eager", [(RABBITMQ_URL, False), (REDIS_URL, True)])
def test_rabbitmq_dead_letters_itself_and_eager_runs_keep_nothing(broker_url, is_eager):
    producer = RecordingProducer()
    keep_failed_task_on_redis(failed_task(broker_url, producer, is_eager), "id-1", ValueError(), (), {})
    assert producer.published == [] and producer.trimmed == []


class FakeSentinel:
    def __init__(self, names):
        self.names, self.asked = names, 0

    def sentinel_masters(self):
        self.asked += 1
        if self.names is None:
            raise redis.exceptions.TimeoutError("down")
        return {
            "celery": {
                "ip": self.names,
                "port": 6380,
                "is_master": True,
                "is_sdown": False,
                "is_odown": False,
                "num-other-sentinels": 2,
            }
        }


def majority_sentinel(*names):
    sentinel = object.__new__(MajoritySentinel)
    sentinel.sentinels, sentinel.min_other_sentinels = [FakeSentinel(name) for name in names], 0
    return sentinel


def test_the_sentinel_channel_asks_the_sentinels_as_majority_sentinel():
    app = Celery(set_as_current=False)
    app.config_from_object(build_celery_config(SENTINEL_URLS, sentinel=SENTINEL))
    # The channel's first ping would reach the Sentinels; no connection is made.
    with mock.patch.object(redis.Redis, "ping", return_value=True), app.connection_for_write() as connection:
        assert type(connection.default_channel.client.connection_pool.sentinel_manager) is MajoritySentinel


def test_the_primary_most_sentinels_name_wins_over_the_first_one():
    # The first Sentinel is cut off with the old primary, which it still names.
    sentinel = majority_sentinel("10.0.0.1", "10.0.0.2", "10.0.0.2")
    assert sentinel.discover_master("celery") == ("10.0.0.2", 6380)


def test_a_sentinel_that_does_not_answer_is_asked_last_and_two_agreeing_suffice():
    sentinel = majority_sentinel(None, "10.0.0.2", "10.0.0.2")
    assert sentinel.discover_master("celery") == ("10.0.0.2", 6380)
    down = next(s for s in sentinel.sentinels if s.names is None)
    assert sentinel.sentinels[-1] is down
    assert sentinel.discover_master("celery") == ("10.0.0.2", 6380) and down.asked == 1
    with pytest.raises(redis.sentinel.MasterNotFoundError):
        majority_sentinel(None, None, None).discover_master("celery")
