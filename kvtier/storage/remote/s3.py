"""Any S3-compatible object store through boto3: concurrent HEAD/GET requests from a bounded pool.

    s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1

Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID, ~/.aws, instance roles); the endpoint
may also come from AWS_ENDPOINT_URL. S3 has no batched read, so a batch is a set of concurrent
requests on `max_connections` connections, bounded by the call's deadline as a whole.

A get reads the object's size from the reply's Content-Length before its body, refuses an object over
`max_object` (closing the connection, body unread), and otherwise reads exactly that many bytes: one
buffer of the declared size, filled straight from the socket (botocore's read(n)); a body shorter or
longer than declared is an error. A reply without Content-Length (chunked) is refused, never read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar
from urllib.parse import SplitResult, parse_qs

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from kvtier.errors import ConfigError, TierError
from kvtier.keys import ChunkKey
from kvtier.storage.remote.store import Buffer, StoreOptions, object_name

T = TypeVar("T")
_QUERY_KEYS = {"endpoint", "region"}
_MISSING = {"404", "NoSuchKey", "NotFound"}
_SOCKET_TIMEOUT = 30.0  # seconds; frees a pool thread stuck on a dead connection (callers stop waiting sooner)


class S3Store:
    """Framed objects as S3 objects named "<prefix>/kvtier/<namespace>/<digest>"."""

    def __init__(self, url: SplitResult, options: StoreOptions) -> None:
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        unknown = set(query) - _QUERY_KEYS
        if unknown:
            raise ConfigError(f"remote.url: unknown s3:// option(s) {', '.join(sorted(unknown))}; use endpoint, region")
        self.scheme = "s3"
        self.bucket = url.netloc
        self.prefix = url.path.strip("/")
        self.where = f"s3://{self.bucket}/{self.prefix}" + (f" at {query['endpoint']}" if "endpoint" in query else "")
        self.max_object = options.max_object
        # One client, made now: making one costs ~0.3 s (botocore loads its service model), which a
        # 50 ms lookup cannot afford. Deadlines are kept by waiting on the pool, not by socket timeouts.
        config = BotoConfig(
            connect_timeout=options.connect_timeout, read_timeout=_SOCKET_TIMEOUT,
            retries={"max_attempts": 1, "mode": "standard"},  # the breaker retries, later
            max_pool_connections=options.max_connections,
        )  # fmt: skip
        session = boto3.session.Session()
        self._s3 = session.client(
            "s3", endpoint_url=query.get("endpoint"), region_name=query.get("region"), config=config
        )
        self._pool = ThreadPoolExecutor(options.max_connections, thread_name_prefix="kvtier-s3")

    def _name(self, key: ChunkKey) -> str:
        return f"{self.prefix}/{object_name(key)}" if self.prefix else object_name(key)

    def _within(self, timeout: float, fn: Callable[[], T]) -> T:
        return self._pool.submit(fn).result(timeout=timeout)  # TimeoutError past the deadline

    def _each(self, keys: Sequence[ChunkKey], timeout: float, fn: Callable[[Any, str], T]) -> list[T]:
        """fn(client, name) for every key concurrently; the whole batch must finish within `timeout`."""
        client = self._s3
        futures: list[Future[T]] = [self._pool.submit(fn, client, self._name(k)) for k in keys]
        done, pending = wait(futures, timeout=timeout, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        for future in done:
            exc = future.exception()
            if exc is not None:
                raise exc
        if pending:
            raise TimeoutError(f"{len(pending)} of {len(keys)} S3 requests took longer than {timeout:.3f} s")
        return [f.result() for f in futures]

    def exists(self, keys: Sequence[ChunkKey], timeout: float) -> list[bool]:
        """Concurrent HEADs, read in order: stops at the first absent key; at the deadline, the
        keys answered so far are the answer (a shorter prefix), unless none was."""
        client = self._s3
        deadline = time.monotonic() + timeout
        futures = [self._pool.submit(self._head, client, self._name(k)) for k in keys]
        found = 0
        try:
            for future in futures:
                if not future.result(timeout=max(0.0, deadline - time.monotonic())):
                    break
                found += 1
        except FutureTimeout:
            if not found:
                raise TimeoutError(f"no S3 HEAD answered within {timeout:.3f} s") from None
        finally:
            for future in futures:
                future.cancel()
        return [True] * found + [False] * (len(keys) - found)

    def _head(self, client: Any, name: str) -> bool:
        try:
            client.head_object(Bucket=self.bucket, Key=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING:
                return False
            raise
        return True

    def get(self, keys: Sequence[ChunkKey], timeout: float) -> list[Buffer | None]:
        return self._each(keys, timeout, self._get_one)

    def _get_one(self, client: Any, name: str) -> bytes | None:
        try:
            response = client.get_object(Bucket=self.bucket, Key=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING:
                return None
            raise
        body = response["Body"]
        try:
            return self._read_body(name, body, response.get("ContentLength"))
        except BaseException:
            body.close()  # an unread rest must not reach the next request on this connection
            raise

    def _read_body(self, name: str, body: Any, size: int | None) -> bytes:
        """Exactly `size` bytes of `body`, after checking `size` against max_object."""
        if size is None:
            raise TierError(f"S3 object {name}: the reply has no Content-Length; refusing an unbounded read")
        if size > self.max_object:
            raise TierError(f"S3 object {name} is {size} bytes, over remote max_object ({self.max_object} bytes)")
        data: bytes = body.read(size)  # one allocation of `size` bytes, read into from the socket: no copy
        if len(data) != size or body.read(1):  # (the empty read(1) also checks botocore's checksum, if any)
            raise TierError(f"S3 object {name}: the body is not the {size} bytes its Content-Length declares")
        return data

    def put(self, key: ChunkKey, parts: Sequence[Buffer], timeout: float) -> None:
        body = b"".join(parts)
        self._within(timeout, lambda: self._s3.put_object(Bucket=self.bucket, Key=self._name(key), Body=body))

    def delete(self, key: ChunkKey, timeout: float) -> bool:
        name = self._name(key)

        def delete() -> bool:
            present = self._head(self._s3, name)  # S3 answers a DELETE alike whether or not the object was there
            if present:
                self._s3.delete_object(Bucket=self.bucket, Key=name)
            return present

        return self._within(timeout, delete)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._s3.close()


def open_store(url: SplitResult, options: StoreOptions) -> S3Store:
    """Factory registered for s3://."""
    return S3Store(url, options)
