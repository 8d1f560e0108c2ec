"""A small S3 endpoint on 127.0.0.1 for storage-fault tests: path-style buckets held in memory,
the calls pyarrow's S3FileSystem makes (HEAD/GET/PUT/DELETE object, ListObjectsV2, multipart
upload), and injected faults: the next N requests matching a method answer 503 SlowDown (what S3
says when it throttles), or every request does while ``down``.

Not S3: no authentication check, no versioning; enough to hold the product's own writes to the
behaviour of a store that fails transiently. No network beyond the loopback interface.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse
from xml.sax.saxutils import escape


class S3State:
    def __init__(self) -> None:
        self.buckets: dict[str, dict[str, bytes]] = {}
        self.uploads: dict[str, dict[int, bytes]] = {}
        self.fail: dict[str, int] = {}  # method -> requests left to fail
        self.down = False
        self.failed = 0
        self.served = 0
        self.lock = threading.Lock()

    def should_fail(self, method: str) -> bool:
        with self.lock:
            if self.down:
                self.failed += 1
                return True
            if self.fail.get(method, 0) > 0:
                self.fail[method] -= 1
                self.failed += 1
                return True
            self.served += 1
            return False


def _body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        raw = b""
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                break
            raw += handler.rfile.read(size)
            handler.rfile.readline()
    else:
        raw = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
    if "aws-chunked" in handler.headers.get("Content-Encoding", "") or \
            handler.headers.get("x-amz-content-sha256", "").startswith("STREAMING"):
        return _aws_chunked(raw)
    return raw


def _aws_chunked(raw: bytes) -> bytes:
    """The payload of an aws-chunked body (``<hex size>[;chunk-signature=..]\\r\\n<data>\\r\\n``
    ... a zero-size chunk, then trailing checksums)."""
    out, pos = b"", 0
    while True:
        end = raw.index(b"\r\n", pos)
        size = int(raw[pos:end].split(b";")[0], 16)
        pos = end + 2
        if size == 0:
            return out
        out += raw[pos: pos + size]
        pos += size + 2


def make_handler(state: S3State):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _split(self) -> tuple[str, str, dict[str, list[str]]]:
            url = urlparse(self.path)
            parts = unquote(url.path).lstrip("/").split("/", 1)
            return parts[0], parts[1] if len(parts) > 1 else "", parse_qs(
                url.query, keep_blank_values=True)

        def _send(self, code: int, body: bytes = b"", headers: dict | None = None,
                  head: bool = False) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, code: int, name: str, head: bool = False) -> None:
            self._send(code, f"<Error><Code>{name}</Code><Message>{name}</Message></Error>"
                       .encode(), {"Content-Type": "application/xml"}, head=head)

        def _fault(self, method: str) -> bool:
            if method in ("PUT", "POST"):
                _body(self)  # read what was sent before answering
            if state.should_fail(method):
                self._error(503, "SlowDown", head=method == "HEAD")
                return True
            return False

        def do_HEAD(self) -> None:
            if self._fault("HEAD"):
                return
            bucket, key, _ = self._split()
            objects = state.buckets.get(bucket)
            if objects is None or (key and key not in objects):
                self._error(404, "NoSuchKey", head=True)
            elif not key:
                self._send(200, head=True)
            else:
                self._send(200, headers={"Content-Type": "application/octet-stream",
                                         "Last-Modified": time.strftime(
                                             "%a, %d %b %Y %H:%M:%S GMT", time.gmtime())},
                           head=True, body=objects[key])

        def do_GET(self) -> None:
            if self._fault("GET"):
                return
            bucket, key, query = self._split()
            objects = state.buckets.get(bucket)
            if objects is None:
                return self._error(404, "NoSuchBucket")
            if not key:
                return self._list(objects, query)
            if key not in objects:
                return self._error(404, "NoSuchKey")
            data = objects[key]
            ranged = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if ranged:
                start = int(ranged.group(1))
                stop = int(ranged.group(2)) + 1 if ranged.group(2) else len(data)
                return self._send(206, data[start:stop], {
                    "Content-Range": f"bytes {start}-{stop - 1}/{len(data)}"})
            self._send(200, data)

        def _list(self, objects: dict[str, bytes], query: dict[str, list[str]]) -> None:
            prefix = query.get("prefix", [""])[0]
            delimiter = query.get("delimiter", [""])[0]
            keys, prefixes = [], set()
            for k in sorted(objects):
                if not k.startswith(prefix):
                    continue
                rest = k[len(prefix):]
                if delimiter and delimiter in rest:
                    prefixes.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
                else:
                    keys.append(k)
            body = "".join(f"<Contents><Key>{escape(k)}</Key><Size>{len(objects[k])}</Size>"
                           "<LastModified>2026-01-01T00:00:00.000Z</LastModified></Contents>"
                           for k in keys)
            body += "".join(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>"
                            for p in sorted(prefixes))
            xml = ('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult>'
                   f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{len(keys) + len(prefixes)}"
                   f"</KeyCount><IsTruncated>false</IsTruncated>{body}</ListBucketResult>")
            self._send(200, xml.encode(), {"Content-Type": "application/xml"})

        def do_PUT(self) -> None:
            bucket, key, query = self._split()
            data = _body(self)
            if state.should_fail("PUT"):
                return self._error(503, "SlowDown")
            if not key:
                state.buckets.setdefault(bucket, {})
                return self._send(200)
            if bucket not in state.buckets:
                return self._error(404, "NoSuchBucket")
            if "uploadId" in query:
                state.uploads[query["uploadId"][0]][int(query["partNumber"][0])] = data
                return self._send(200, headers={"ETag": f'"{uuid.uuid4().hex}"'})
            source = self.headers.get("x-amz-copy-source")
            if source:  # CopyObject: what a move is made of on S3
                src_bucket, src_key = unquote(source).lstrip("/").split("/", 1)
                if src_key not in state.buckets.get(src_bucket, {}):
                    return self._error(404, "NoSuchKey")
                state.buckets[bucket][key] = state.buckets[src_bucket][src_key]
                return self._send(200, b"<CopyObjectResult><ETag>\"x\"</ETag>"
                                  b"</CopyObjectResult>", {"Content-Type": "application/xml"})
            state.buckets[bucket][key] = data
            self._send(200, headers={"ETag": f'"{uuid.uuid4().hex}"'})

        def do_POST(self) -> None:
            bucket, key, query = self._split()
            _body(self)
            if state.should_fail("POST"):
                return self._error(503, "SlowDown")
            if "uploads" in query:
                upload = uuid.uuid4().hex
                state.uploads[upload] = {}
                xml = (f"<InitiateMultipartUploadResult><Bucket>{bucket}</Bucket><Key>"
                       f"{escape(key)}</Key><UploadId>{upload}</UploadId>"
                       "</InitiateMultipartUploadResult>")
                return self._send(200, xml.encode(), {"Content-Type": "application/xml"})
            if "uploadId" in query:
                parts = state.uploads.pop(query["uploadId"][0])
                state.buckets[bucket][key] = b"".join(parts[n] for n in sorted(parts))
                xml = (f"<CompleteMultipartUploadResult><Bucket>{bucket}</Bucket><Key>"
                       f"{escape(key)}</Key><ETag>\"x\"</ETag></CompleteMultipartUploadResult>")
                return self._send(200, xml.encode(), {"Content-Type": "application/xml"})
            if "delete" in query:
                return self._send(200, b"<DeleteResult></DeleteResult>",
                                  {"Content-Type": "application/xml"})
            self._error(400, "InvalidRequest")

        def do_DELETE(self) -> None:
            if self._fault("DELETE"):
                return
            bucket, key, query = self._split()
            if "uploadId" in query:
                state.uploads.pop(query["uploadId"][0], None)
            else:
                state.buckets.get(bucket, {}).pop(key, None)
            self._send(204)

    return Handler


class S3Server:
    """``with S3Server() as s3:`` serves on 127.0.0.1:<s3.port> in a thread."""

    def __init__(self) -> None:
        self.state = S3State()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.state))
        self.port = self.httpd.server_address[1]

    def __enter__(self) -> S3Server:
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
