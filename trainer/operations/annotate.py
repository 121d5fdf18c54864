"""The annotation page of active learning (`active.py serve RUN_DIR`): the queries one at a time in a
browser, each answer written to the answers CSV the moment it is given, where `active.py import` and
`pipeline.answers=` read it; a killed server loses no answer, and a restarted one resumes.

The standard library's HTTP server and one page (annotate.html beside this file: inline CSS and JS, no
CDN, no build step), for a login node reached through an SSH tunnel: it binds 127.0.0.1 unless told
otherwise. It serves the page, its state and images by number only: query N (`/img/q/N.png`) and labeled
example K of class C (`/img/e/C/K.png`). No URL names a path, so none reaches a file outside the dataset:
any other URL is a 404. One server per answers file: ANSWERS.lock (rundir.Lock) refuses a second.

The answers CSV (path,label) holds the answers in the order given, so undo takes back the last one, also
after a restart; an empty label is "unsure" (left out of labeled.csv). A query skipped is not in it.
RUN_DIR/answering.json says where the answers go and the command that goes on once they are given: the
active stage writes it with its queries (`active.py import`), the pipeline when it pauses for them
(the pipeline's own command with pipeline.answers).
"""
from __future__ import annotations

import csv
import hashlib
import http.server
import io
import json
import os
import posixpath
import re
import shlex
import threading

from PIL import Image, ImageOps

from data import atomic
from data.datasets import BadImageError, load_image, read_classes, read_split
from data.errors import InputError
from data.labels import read_csv
from trainer.operations import annotations
from trainer.runtime import rundir

NEXT_STEP = "answering.json"
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "annotate.html")
EXAMPLES_PER_CLASS = 3
LARGEST_SIDE = 512   # px of an image sent: a photo's full resolution need not cross an SSH tunnel
KEYS = "1234567890abcdefghijklmnopqrstuvwxyz"   # class i's key; the commands use Enter, Space, ?, Backspace
LOCAL = ("127.0.0.1", "localhost")


def write_next_step(run_dir: str, answers: str, command: list[str]):
    """RUN_DIR/answering.json: the answers file the page writes and the command that reads it."""
    atomic.write_json(os.path.join(run_dir, NEXT_STEP), {"answers": os.path.abspath(answers), "command": command})


def next_step(run_dir: str) -> tuple[str, str]:
    """(answers file, the command that goes on) from RUN_DIR/answering.json; a run dir without one (made
    before it existed) gets RUN_DIR/answers.csv and the import command with the config left to fill in."""
    path = os.path.join(run_dir, NEXT_STEP)
    if not os.path.exists(path):
        answers = os.path.join(os.path.abspath(run_dir), "answers.csv")
        return answers, (f"python launch/active.py import {shlex.quote(answers)} --config YOUR_ACTIVE_CONFIG "
                         f"run.dir={shlex.quote(run_dir)}")
    with open(path, encoding="utf-8") as f:
        step = json.load(f)
    return step["answers"], shlex.join(step["command"])


class Session:
    """The queries, the classes with a few labeled examples each, and the answers given so far: {query
    number: class id, or None for unsure}, in the order given, as the answers CSV holds them."""

    def __init__(self, run_dir: str, answers_path: str):
        cfg = annotations.active_run_config(run_dir)
        self.root = os.path.abspath(cfg["data"]["root"])
        self.queries_csv = os.path.join(run_dir, "queries.csv")
        self.queries = annotations.read_queries(self.queries_csv)
        self.classes = read_classes(self.root)
        self.images = read_split(self.root, self.queries_csv).paths   # each checked to lie inside the dataset
        labeled = read_split(self.root, cfg["active"]["labeled"])
        self.examples = [[p for p, y in zip(labeled.paths, labeled.labels) if y == c][:EXAMPLES_PER_CLASS]
                         for c in range(len(self.classes))]
        # in every image URL: a browser never shows an image it cached for other queries (a rerun of active)
        self.version = hashlib.sha256(json.dumps([self.images, self.examples]).encode()).hexdigest()[:12]
        self.answers_path = answers_path
        self.answers = self._read_answers()
        self._writing = threading.Lock()

    def _read_answers(self) -> dict:
        """The answers file as it was left (checked as `active.py import` checks it), or none yet."""
        if not os.path.exists(self.answers_path):
            return {}
        ids = annotations.import_answers(self.answers_path, self.queries, self.queries_csv, self.root, self.classes)
        number = {q["path"]: n for n, q in enumerate(self.queries)}
        header, rows = read_csv(self.answers_path, "the answers")
        column = header.index("path")
        return {number[p]: ids.get(p) for p in (posixpath.normpath(row[column].strip()) for row in rows)}

    def answer(self, query: int, label: int | None) -> list:
        """Query `query` is class `label` (None: unsure), written before this returns; a query answered
        before moves to the end, as the latest answer. Returns the answers given (given())."""
        with self._writing:
            self.answers.pop(query, None)
            self.answers[query] = label
            self._write()
            return self._given()

    def undo(self) -> tuple[int | None, list]:
        """Takes back the latest answer: (its query, None when there is none; the answers given)."""
        with self._writing:
            query = next(reversed(self.answers), None)
            if query is not None:
                del self.answers[query]
                self._write()
            return query, self._given()

    def given(self) -> list:
        """[[query, class id or None], ...] in the order given."""
        with self._writing:
            return self._given()

    def _given(self) -> list:
        return [[n, c] for n, c in self.answers.items()]

    def _write(self):
        # durable: an answer costs a person seconds, the fsync a few milliseconds
        with atomic.writing(self.answers_path, durable=True) as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label"])
            writer.writerows((self.queries[n]["path"], "" if c is None else self.classes[c])
                             for n, c in self.answers.items())

    def state(self, next_command: str) -> dict:
        """What the page shows: classes (name, key, examples), queries, the answers in the order given."""
        index = {name: c for c, name in enumerate(self.classes)}
        return {
            "classes": [{"name": name, "key": KEYS[c] if c < len(KEYS) else "", "examples": len(self.examples[c])}
                        for c, name in enumerate(self.classes)],
            "queries": [{"path": q["path"], "cluster": int(q["cluster"]), "margin": float(q["margin"]),
                         "guesses": [index[q[k]] for k in ("guess", "runner_up") if q.get(k) in index]}
                        for q in self.queries],
            "answers": self.given(),
            "answers_file": self.answers_path,
            "version": self.version,
            "next": next_command,
        }

    def image(self, path: str) -> bytes:
        """`path` as a PNG no larger than LARGEST_SIDE (any format Pillow reads, EXIF-rotated)."""
        image = load_image(path)
        if max(image.size) > LARGEST_SIDE:
            image = ImageOps.contain(image, (LARGEST_SIDE, LARGEST_SIDE), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()


# Every URL served, matched whole against the raw path (never decoded: %2e%2e is no number): anything else 404s.
QUERY_IMAGE, EXAMPLE_IMAGE = re.compile(r"/img/q/(\d{1,9})\.png"), re.compile(r"/img/e/(\d{1,9})/(\d{1,9})\.png")


def handler(session: Session, next_command: str):
    with open(PAGE, "rb") as f:
        page = f.read()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format, *args):   # one line per request would bury the address in a terminal
            pass

        def _send(self, status: int, body: bytes, content_type: str, cache: bool = False):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            # images are cached: their URLs carry the version of the queries and examples (Session.version)
            self.send_header("Cache-Control", "max-age=86400" if cache else "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj, status: int = 200):
            self._send(status, json.dumps(obj).encode(), "application/json")

        def _text(self, status: int, text: str):
            self._send(status, text.encode(), "text/plain; charset=utf-8")

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            query, example = QUERY_IMAGE.fullmatch(path), EXAMPLE_IMAGE.fullmatch(path)
            if path == "/":
                return self._send(200, page, "text/html; charset=utf-8")
            if path == "/api/state":
                return self._json(session.state(next_command))
            if query and int(query[1]) < len(session.images):
                return self._image(session.images[int(query[1])])
            if example and int(example[1]) < len(session.examples) and \
                    int(example[2]) < len(session.examples[int(example[1])]):
                return self._image(session.examples[int(example[1])][int(example[2])])
            self._text(404, "not found")

        def _image(self, path: str):
            try:
                self._send(200, session.image(path), "image/png", cache=True)
            except BadImageError as e:
                self._text(500, str(e))

        def do_POST(self):
            # JSON only: a form or a page elsewhere cannot send it without asking first (CORS), so no other
            # site open in the browser can answer for the annotator
            if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
                return self._text(415, "expected Content-Type: application/json")
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}") if 0 <= length <= 4096 else None
            except ValueError:
                body = None
            if not isinstance(body, dict):
                return self._text(400, "expected a JSON object of at most 4096 bytes")
            path = self.path.split("?", 1)[0]
            if path == "/api/answer":
                query, label = body.get("query"), body.get("label")
                if not (type(query) is int and 0 <= query < len(session.queries)):   # not a bool
                    return self._text(400, f"query: expected a number in [0, {len(session.queries)})")
                if not (label is None or type(label) is int and 0 <= label < len(session.classes)):
                    return self._text(400, f"label: expected a class id in [0, {len(session.classes)}) or null")
                return self._json({"answers": session.answer(query, label)})
            if path == "/api/undo":
                undone, given = session.undo()
                return self._json({"undone": undone, "answers": given})
            self._text(404, "not found")

    return Handler


class Server(http.server.ThreadingHTTPServer):
    """Holds the lock on its answers file until it is closed."""
    daemon_threads = True

    def __init__(self, address, handler_class, lock: rundir.Lock):
        self.lock = lock   # first: a failed bind closes the server, and so releases it
        super().__init__(address, handler_class)

    def server_close(self):
        super().server_close()
        self.lock.release()


def make_server(run_dir: str, answers: str | None = None, host: str = "127.0.0.1",
                port: int = 8000) -> tuple[Server, Session]:
    """The server for RUN_DIR's queries, bound and holding the lock on its answers file, not yet serving.
    `answers`: where the answers go (default: answering.json's, else RUN_DIR/answers.csv)."""
    default_answers, next_command = next_step(run_dir)
    answers = os.path.abspath(answers or default_answers)
    if not answers.endswith(".csv"):
        raise InputError(f"--answers {answers}: expected a .csv file (path,label), which the page writes")
    if not os.path.isdir(os.path.dirname(answers)):
        raise InputError(f"--answers {answers}: its folder does not exist")
    try:
        lock = rundir.Lock(os.path.dirname(answers), os.path.basename(answers) + ".lock")
    except rundir.RunDirError:
        raise InputError(f"{answers}: another `active.py serve` is writing it ({answers}.lock is locked): "
                         "use its page, or stop it first") from None
    folder = os.path.dirname(answers)
    for name in os.listdir(folder):   # what a server killed mid-write left: the answers file itself is whole
        if atomic.temporary_target(name) == os.path.basename(answers):
            os.remove(os.path.join(folder, name))
    try:
        session = Session(run_dir, answers)
        try:
            return Server((host, port), handler(session, next_command), lock), session
        except OSError as e:
            raise InputError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
                             "pass another --port") from None
    except BaseException:
        lock.release()
        raise


def serve(run_dir: str, answers: str | None, host: str, port: int):
    """Serve the page until Ctrl-C; says its address, and how to reach it through an SSH tunnel."""
    server, session = make_server(run_dir, answers, host, port)
    port = server.server_address[1]
    print(f"[active] annotation page: http://{host}:{port}/ ({len(session.answers)} of {len(session.queries)} "
          f"queries answered; answers: {session.answers_path}); Ctrl-C stops it", flush=True)
    if host in LOCAL:
        print(f"[active] from another machine: ssh -L {port}:localhost:{port} THIS_HOST, then open "
              f"http://localhost:{port}/", flush=True)
    else:
        print(f"[active] --host {host}: anyone who can reach this machine can answer; "
              "the default 127.0.0.1 and an SSH tunnel keep it yours", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
