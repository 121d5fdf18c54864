"""The annotation page of active learning (`launch/active.py serve`, trainer/operations/annotate.py): each
answer in the answers CSV once given, none lost to a kill -9, resumed on restart, a second server on the same
file refused, images served by number only (every URL that names a path: 404), the pipeline's pause naming
the page; and in headless Chromium (Debian's chromium + chromium-driver through selenium), a person's round
trip from the page to the labeled.csv the oracle makes for the same answers.
"""
import contextlib
import csv
import http.client
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import types

import numpy as np
import pytest
import yaml
from PIL import Image

import test_active
from test_active import QUERIES, rows
from tiny import ENV, ROOT
from data.datasets import load_image, read_classes, read_split
from data.errors import InputError
from launch import active
from trainer.operations import annotate, pipeline_answers


oracle_run = test_active.oracle_run   # the fixture this module builds on: a tiny oracle-answered active run


@pytest.fixture(scope="module")
def queries_run(oracle_run, tmp_path_factory):
    """The oracle run's config with active.oracle=false: the same queries, waiting for a person."""
    _, _, _, oracle_dir, args = oracle_run
    run = tmp_path_factory.mktemp("queries") / "run"
    active.main([*args, f"run.dir={run}", "active.oracle=false"])
    assert (run / "queries.csv").read_bytes() == (oracle_dir / "queries.csv").read_bytes()
    return run


def copy_run(run, folder):
    """The files of an active run dir that serve and import read, in a folder of their own."""
    os.makedirs(folder, exist_ok=True)
    for name in ("run.json", "config.yaml", "queries.csv"):
        shutil.copy(run / name, folder / name)
    return folder


@contextlib.contextmanager
def serving(run_dir, answers=None):
    """make_server on a free port, serving from a thread; yields (host:port, session)."""
    server, session = annotate.make_server(str(run_dir), answers and str(answers), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", session
    finally:
        server.shutdown()
        server.server_close()


def request(address, method, path, body=None, content_type="application/json"):
    """(status, body bytes); the path is sent exactly as given (http.client does not normalise it)."""
    connection = http.client.HTTPConnection(address, timeout=30)
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    connection.request(method, path, body=data, headers={"Content-Type": content_type} if data is not None else {})
    response = connection.getresponse()
    return response.status, response.read()


def answer(address, query, label):
    status, body = request(address, "POST", "/api/answer", {"query": query, "label": label})
    assert status == 200, body
    return json.loads(body)


def csv_rows(path):
    with open(path, newline="") as f:
        return [tuple(row) for row in csv.reader(f)]


def in_order(given):
    """{query: class id or None} for answers given [(query, label)] in turn: a query answered again moves last."""
    latest = {}
    for query, label in given:
        latest.pop(query, None)
        latest[query] = label
    return latest


def expected_rows(queries, classes, given):
    """The answers CSV once `given` were answered."""
    return [("path", "label")] + [(queries[q]["path"], "" if c is None else classes[c])
                                  for q, c in in_order(given).items()]


def start_server(run_dir, answers):
    """`launch/active.py serve` in a process of its own; returns it and its address, from the line it prints."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "active.py"), "serve", str(run_dir),
                             "--port", "0", "--answers", str(answers)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    line = proc.stdout.readline()
    found = re.search(r"http://(127\.0\.0\.1:\d+)/", line)
    assert found, f"{line}{proc.stderr.read() if proc.poll() is not None else ''}"
    return proc, found[1]


def test_no_answer_is_lost_to_a_kill_and_a_restart_resumes(oracle_run, queries_run, tmp_path):
    data, _, _, _, args = oracle_run
    classes, queries = read_classes(data), rows(queries_run / "queries.csv")
    answers = tmp_path / "answers.csv"
    proc, address = start_server(queries_run, answers)
    try:
        second = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "active.py"), "serve", str(queries_run),
                                 "--port", "0", "--answers", str(answers)], capture_output=True, text=True, env=ENV,
                                timeout=120)
        assert second.returncode == 2 and second.stderr.splitlines() == [
            f"active.py: error: {answers}: another `active.py serve` is writing it ({answers}.lock is locked): "
            "use its page, or stop it first"]
        # answers in no order of the queries', some unsure (None), many given again: more than are given before the kill
        given = [((5 * i) % QUERIES, None if i % 7 == 3 else i % 10) for i in range(400)]
        acknowledged, mismatches = [], []

        def annotator():
            try:
                for query, label in given:
                    answer(address, query, label)
                    acknowledged.append((query, label))
                    # what was answered is in the file the moment the server says so
                    if csv_rows(answers) != expected_rows(queries, classes, acknowledged):
                        mismatches.append(len(acknowledged))
            except (ConnectionError, http.client.HTTPException):   # killed below
                pass

        thread = threading.Thread(target=annotator)
        thread.start()
        while len(acknowledged) < 5 and thread.is_alive():
            thread.join(0.001)
        proc.send_signal(signal.SIGKILL)   # part-way through, maybe while an answer is being written
        proc.wait()
        thread.join()
    finally:
        proc.kill()
        proc.wait()
    assert mismatches == [] and 5 <= len(acknowledged) < len(given)
    on_disk = csv_rows(answers)
    # every acknowledged answer, and at most the one the kill cut off
    (cut,) = [k for k in (len(acknowledged), len(acknowledged) + 1) if on_disk == expected_rows(queries, classes,
                                                                                                given[:k])]
    # a kill mid-write may leave a temporary beside the whole answers file; the restarted server removes it
    (tmp_path / "answers.csv.0123abcd.tmp").write_text("path,la")   # as a kill mid-write would, if this one did not
    with serving(queries_run, answers) as (address, session):   # restarted: resumes where the kill left it
        assert sorted(os.listdir(tmp_path)) == ["answers.csv", "answers.csv.lock"]
        kept = in_order(given[:cut])
        state = json.loads(request(address, "GET", "/api/state")[1])
        assert state["answers"] == [[q, c] for q, c in kept.items()]
        status, body = request(address, "POST", "/api/undo", {})
        assert status == 200 and json.loads(body)["undone"] == list(kept)[-1]
        after_undo = csv_rows(answers)
        assert after_undo == on_disk[:-1]
    # the file the page wrote is what import reads: labeled.csv = labeled + the answers (not the unsure), in query order
    run = copy_run(queries_run, tmp_path / "import")
    active.main(["import", str(answers), *args, f"run.dir={run}"])
    labels = {path: label for path, label in after_undo[1:] if label}
    assert 0 < len(labels) < len(after_undo) - 1   # some labeled, some unsure
    assert rows(run / "labeled.csv") == rows(os.path.join(data, "labeled.csv")) + [
        {"path": q["path"], "label": str(classes.index(labels[q["path"]]))} for q in queries if q["path"] in labels]


# URLs that name a path, in every spelling: none reaches a file (a query image's own absolute path neither)
TRAVERSALS = ["/img/../../etc/passwd", "/img/q/../../../../etc/passwd", "/img/q/0.png/../../../../etc/passwd",
              "/img/q/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
              "/img/q/%252e%252e%252f%252e%252e%252fetc%252fpasswd", "/img/q/..\\..\\..\\etc\\passwd",
              "/img/q/..%5c..%5c..%5cetc%5cpasswd", "//etc/passwd", "/etc/passwd", "/img/e/0/..%2f..%2fqueries.csv",
              "/queries.csv", "/config.yaml", "/annotate.py", "/img/q/-1.png", f"/img/q/{QUERIES}.png",
              "/img/e/0/3.png", "/img/e/10/0.png", "/img/q/1e1.png", "/img/q/0.png%00", "/img/q/%30.png"]


def test_images_are_served_by_number_and_nothing_else(queries_run, tmp_path):
    queries = rows(queries_run / "queries.csv")
    with open(queries_run / "config.yaml") as f:
        data = read_split(yaml.safe_load(f)["data"]["root"], "labeled")
    with serving(queries_run, tmp_path / "answers.csv") as (address, session):
        own_path = "/img/q/" + session.images[0]   # an absolute path inside the dataset
        for path in TRAVERSALS + [own_path, "/" + session.images[0]]:
            status, body = request(address, "GET", path)
            assert (status, body) == (404, b"not found"), path
        for n in (0, QUERIES - 1):
            status, body = request(address, "GET", f"/img/q/{n}.png")
            assert status == 200
            served = np.asarray(Image.open(io.BytesIO(body)))
            assert np.array_equal(served, np.asarray(load_image(os.path.join(data.root, queries[n]["path"]))))
        for c, k in ((0, 0), (9, 2)):   # example k of class c: the k-th labeled image of class c
            status, body = request(address, "GET", f"/img/e/{c}/{k}.png")
            example = [p for p, y in zip(data.paths, data.labels) if y == c][k]
            assert status == 200 and np.array_equal(np.asarray(Image.open(io.BytesIO(body))),
                                                    np.asarray(load_image(example)))
        status, page = request(address, "GET", "/")
        assert status == 200 and b"<title>semiscale: label the queries</title>" in page and b"http" not in page
        state = json.loads(request(address, "GET", "/api/state")[1])
        classes = read_classes(data.root)
        assert [c["name"] for c in state["classes"]] == classes
        assert [c["key"] for c in state["classes"]] == list("1234567890")
        assert [q["path"] for q in state["queries"]] == [q["path"] for q in queries]
        assert [q["guesses"] for q in state["queries"]] == [[classes.index(q["guess"]), classes.index(q["runner_up"])]
                                                            for q in queries]
        assert state["answers"] == [] and state["answers_file"] == str(tmp_path / "answers.csv")


@pytest.mark.parametrize("body, content_type, status", [
    ({"query": 0, "label": 1}, "text/plain", 415),   # what a form on another site could send
    (b"query=0&label=1", "application/x-www-form-urlencoded", 415),
    (b"{not json", "application/json", 400),
    ({"query": QUERIES, "label": 1}, "application/json", 400),
    ({"query": -1, "label": 1}, "application/json", 400),
    ({"query": 0, "label": 10}, "application/json", 400),
    ({"query": 0, "label": "Bag"}, "application/json", 400),
    ({"query": "0", "label": 1}, "application/json", 400),
])
def test_a_bad_answer_writes_nothing(queries_run, tmp_path, body, content_type, status):
    with serving(queries_run, tmp_path / "answers.csv") as (address, _):
        assert request(address, "POST", "/api/answer", body, content_type)[0] == status
        assert request(address, "POST", "/api/elsewhere", {}, "application/json")[0] == 404
    assert not os.path.exists(tmp_path / "answers.csv")


def test_an_answers_file_that_is_not_the_queries_is_refused_in_one_line(queries_run, tmp_path):
    answers = tmp_path / "answers.csv"
    answers.write_text("path,label\nimages/train/99999.png,Bag\n")
    with pytest.raises(InputError, match=f"^{re.escape(str(answers))}:2: images/train/99999.png is not one of the "
                                         f"{QUERIES} queries"):
        annotate.make_server(str(queries_run), str(answers), port=0)


def test_the_pipeline_pause_names_the_page_which_writes_where_the_pipeline_reads(queries_run, tmp_path):
    run = tmp_path / "runs" / "own"
    active_dir = copy_run(queries_run, run / "active")
    script = os.path.join(ROOT, "launch", "pipeline.py")
    args = types.SimpleNamespace(config="configs/own/pipeline.yaml", overrides=["run.dir=runs/own",
                                                                               "pipeline.answers=old.csv"])
    cfg = types.SimpleNamespace(run=types.SimpleNamespace(dir=str(run)), data=types.SimpleNamespace(root="data"))
    line = pipeline_answers.pause_line(script, args, cfg, str(active_dir))
    serve = shlex.join(["python", os.path.relpath(os.path.join(ROOT, "launch", "active.py")), "serve", str(active_dir)])
    assert line.startswith(f"[pipeline] paused for your labels: answer them in your browser with {serve} ")
    command = ["python", os.path.relpath(script), "--config", "configs/own/pipeline.yaml", "run.dir=runs/own",
               f"pipeline.answers={run}/answers.csv"]
    assert line.endswith(f"then continue with: {shlex.join(command)}")
    assert annotate.next_step(str(active_dir)) == (f"{run}/answers.csv", shlex.join(command))
    with serving(active_dir) as (address, session):   # no --answers: the page writes the pipeline's file
        answer(address, 2, 6)
        assert json.loads(request(address, "GET", "/api/state")[1])["next"] == shlex.join(command)
    assert csv_rows(run / "answers.csv") == [("path", "label"), (session.queries[2]["path"], session.classes[6])]


# ---- in a real browser ----

@pytest.fixture(scope="module")
def chromium():
    """Headless Chromium driven by selenium (skips with the reason where either is missing)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("Chromium or chromedriver is not installed (sh tests/chromium_install.sh, as root on Debian)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    try:
        yield browser
    finally:
        browser.quit()


def viewport(browser, width, height, mobile):
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})


def screenshot(browser, tmp_path, name, size):
    """The page as shown, into the test's folder; into SEMISCALE_SCREENSHOTS too when set (the README's laptop
    one: `SEMISCALE_SCREENSHOTS=docs/img pytest tests/test_annotate.py`), so a test run leaves the tree as it was."""
    path = tmp_path / name
    browser.save_screenshot(str(path))
    assert Image.open(path).size == size
    if os.environ.get("SEMISCALE_SCREENSHOTS"):
        shutil.copy(path, os.path.join(os.environ["SEMISCALE_SCREENSHOTS"], name))


def test_a_person_answers_in_chromium_and_the_answers_import_as_the_oracles(chromium, oracle_run, queries_run,
                                                                            tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    data, _, _, oracle_dir, _ = oracle_run
    classes, queries = read_classes(data), rows(queries_run / "queries.csv")
    hidden = {r["path"]: int(r["label"]) for r in rows(os.path.join(data, "unlabeled.csv"))}
    truth = [hidden[q["path"]] for q in queries]
    keys = "1234567890"
    browser = chromium
    wait = WebDriverWait(browser, 20)

    def shown(query, answered):   # the page shows `query` and counts `answered` answers
        wait.until(lambda b: b.find_element(By.ID, "info").text.startswith(f"Query {query + 1} of {QUERIES}")
                   and b.find_element(By.ID, "counts").text.startswith(f"{answered} / {QUERIES} answered"))

    def press(key):
        ActionChains(browser).send_keys(key).perform()

    def click_class(c):
        browser.find_element(By.CSS_SELECTOR, f'#classes button[data-class="{c}"]').click()

    with serving(queries_run) as (address, session):   # answers where answering.json says: run.dir/answers.csv
        viewport(browser, 1366, 768, mobile=False)
        browser.get(f"http://{address}/")
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "body[data-ready]"))
        shown(0, 0)
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#guesses button small")] == ["GUESS",
                                                                                                     "RUNNER-UP"]
        click_class(truth[0])                        # by click
        shown(1, 1)
        press(keys[(truth[1] + 1) % 10])             # a wrong key, taken back
        shown(2, 2)
        press(Keys.BACKSPACE)
        shown(1, 1)
        press(keys[truth[1]])                        # by key
        shown(2, 2)
        browser.find_element(By.ID, "skip").click()  # query 3 left for later
        shown(3, 2)
        guess = classes.index(queries[3]["guess"])
        press(Keys.ENTER if guess == truth[3] else keys[truth[3]])
        shown(4, 3)
        screenshot(browser, tmp_path, "annotate-laptop.png", (1366, 768))
        browser.refresh()                            # resumes at the first open query; query 3 still skipped
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "body[data-ready]"))
        shown(4, 3)
        viewport(browser, 390, 844, mobile=True)
        screenshot(browser, tmp_path, "annotate-phone.png", (390, 844))
        viewport(browser, 1366, 768, mobile=False)
        for n in range(4, QUERIES):
            press(keys[truth[n]])
            shown(n + 1 if n + 1 < QUERIES else 2, n)
        click_class(truth[2])                        # the skipped one comes back last
        wait.until(lambda b: b.find_element(By.ID, "done").is_displayed())
        command = browser.find_element(By.ID, "next").text
        assert command == annotate.next_step(str(queries_run))[1]
        assert browser.find_element(By.ID, "counts").text == f"{QUERIES} / {QUERIES} answered"
    order = [0, 1, 3, *range(4, QUERIES), 2]
    assert csv_rows(queries_run / "answers.csv") == [("path", "label")] + [(queries[n]["path"], classes[truth[n]])
                                                                           for n in order]
    # "done" names the command that goes on: run as shown, it imports into the labeled.csv the oracle wrote
    argv = shlex.split(command)
    assert argv[:3] == ["python", os.path.relpath(os.path.join(ROOT, "launch", "active.py")), "import"]
    proc = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (queries_run / "labeled.csv").read_bytes() == (oracle_dir / "labeled.csv").read_bytes()
