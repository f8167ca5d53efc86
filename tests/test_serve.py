"""The LitServe server: answers equal predict's, bad requests fail alone, a real loopback run."""

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from omegaconf import OmegaConf

from experiments.bench_serve import cpu_session, free_port, offline_rows, wait_healthy
from met_lightning.errors import CheckpointError, ConfigError, MetError
from met_lightning.predict import predict
from tests.helpers import entry_config, predict_config
from tests.test_predict import write_digits

ls = pytest.importorskip("litserve")
from asgi_lifespan import LifespanManager  # noqa: E402
from litserve.utils import WorkerSetupStatus, wrap_litserve_start  # noqa: E402

from met_lightning.serve import build_server, serve, wait_until_ready  # noqa: E402
from met_lightning.serve_metrics import ENV  # noqa: E402

ROW_KEYS = ("class", "class_name", "confidence", "exit", "block", "macs")


def serve_cfg(**values):
    return entry_config("serve", **values)


def expected_rows(checkpoint, folder, **thresholds):
    """predict's rows for the files of `folder`, keyed by file name."""
    rows = predict(predict_config(checkpoint=str(checkpoint), input=str(folder), show=0,
                               **thresholds))["rows"]  # fmt: skip
    return {os.path.basename(r["file"]): {k: r[k] for k in ROW_KEYS} for r in rows}


def mixed_threshold(checkpoint, folder):
    """A threshold at exit 1 that lets some images of `folder` leave there and keeps others."""
    first = expected_rows(checkpoint, folder, thresholds=[0.0])
    confidences = sorted(r["confidence"] for r in first.values())
    return (confidences[len(confidences) // 2 - 1] + confidences[len(confidences) // 2]) / 2


def as_row(response):
    return {k: response.json()[k] for k in ROW_KEYS}


async def post_all(server, requests):
    """Send `requests` ((kwargs for client.post)) concurrently to an in-process server (an
    exception in the app is a 500, as a real server answers it)."""
    with wrap_litserve_start(server) as started:
        async with (
            LifespanManager(started.app) as manager,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=manager.app, raise_app_exceptions=False),
                base_url="http://test",
            ) as client,
        ):
            health = await client.get("/health")
            for _ in range(600):  # 503 until the worker process has loaded the model
                if health.status_code == 200:
                    break
                await asyncio.sleep(0.2)
                health = await client.get("/health")
            info = await client.get("/info")
            answers = await asyncio.gather(*(client.post("/predict", **r) for r in requests))
    return health, info.json()["model"], answers


def assert_rows_equal(served, expected):
    """Same class, exit, block and MACs; confidence equal up to float noise (another batch
    composition runs other kernels)."""
    if isinstance(served, dict):
        assert served.keys() == expected.keys()
        served, expected = list(served.values()), [expected[k] for k in served]
    for got, want in zip(served, expected, strict=True):
        assert {k: v for k, v in got.items() if k != "confidence"} == {
            k: v for k, v in want.items() if k != "confidence"
        }
        assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-5)


def upload(path):
    return {"files": {"file": (path.name, path.read_bytes(), "image/png")}}


def as_json(path):
    return {"json": {"image": base64.b64encode(path.read_bytes()).decode()}}


def test_bench_serve_expects_predicts_rows(tiny_run, tmp_path):
    """The rows `bench_serve --faults` checks served answers against are predict's rows."""
    inputs = write_digits(tmp_path / "in", range(24))
    threshold = mixed_threshold(tiny_run, inputs)
    expected = expected_rows(tiny_run, inputs, thresholds=[threshold])
    files = sorted(inputs.iterdir())
    session = cpu_session(tiny_run, thresholds=[threshold])
    rows = offline_rows(session, [p.read_bytes() for p in files])
    served = {p.name: {k: r[k] for k in ROW_KEYS} for p, r in zip(files, rows, strict=True)}
    assert_rows_equal(served, expected)
    assert len({r["exit"] for r in rows}) == 2  # both exits answer some images


@pytest.mark.demo
def test_served_answers_equal_predict_on_the_demo_test_images(demo_run, tmp_path):
    from sklearn.datasets import load_digits

    from met_lightning.data.digits import stratified_split

    _, folder = demo_run
    seed = OmegaConf.load(folder / "config.yaml").seed
    _, _, test_index = stratified_split(load_digits().target, 0.2, 0.2, seed=seed)
    inputs = write_digits(tmp_path / "in", test_index[:48])
    expected = expected_rows(folder, inputs, budget=0.5)
    files = sorted(inputs.iterdir())
    server, info = build_server(serve_cfg(checkpoint=str(folder), budget=0.5, device="cpu",
                                          max_batch_size=16, batch_timeout=0.2))  # fmt: skip
    requests = [upload(p) if i % 2 else as_json(p) for i, p in enumerate(files)]
    health, served_info, answers = asyncio.run(post_all(server, requests))
    assert health.status_code == 200
    assert served_info["exits"] == info["exits"] and served_info["budget"] == 0.5
    assert [a.status_code for a in answers] == [200] * len(files)
    assert_rows_equal({p.name: as_row(a) for p, a in zip(files, answers, strict=True)}, expected)
    assert len({r["exit"] for r in expected.values()}) > 1  # the budget really exits early
    assert max(a.json()["batch_size"] for a in answers) > 1  # requests were batched


def test_bad_requests_fail_alone_in_a_batch(tiny_run, tmp_path):
    inputs = write_digits(tmp_path / "in", range(4))
    files = sorted(inputs.iterdir())
    threshold = mixed_threshold(tiny_run, inputs)
    expected = expected_rows(tiny_run, inputs, thresholds=[threshold])
    assert {r["exit"] for r in expected.values()} == {1, 2}
    server, info = build_server(serve_cfg(checkpoint=str(tiny_run), thresholds=[threshold],
                                          device="cpu", max_batch_size=8, batch_timeout=0.5,
                                          max_upload_mb=0.01))  # fmt: skip
    assert info["thresholds"] == [threshold, "-inf"] and len(info["macs_per_exit"]) == 2
    requests = [
        upload(files[0]),
        as_json(files[1]),
        {"files": {"file": ("broken.png", b"not a png at all", "image/png")}},  # 400
        {"files": {"image": ("x.png", files[2].read_bytes(), "image/png")}},  # 422
        {"json": {"picture": "AAAA"}},  # 422
        {"json": {"image": "%%% not base64"}},  # 400
        upload(files[2]),
        {"content": b"x", "headers": {"content-type": "text/plain"}},  # 415
        {"files": {"file": ("big.png", b"0" * 20_000, "image/png")}},  # 413
        {"content": b"{not json", "headers": {"content-type": "application/json"}},  # 400
        as_json(files[3]),
    ]
    _, _, answers = asyncio.run(post_all(server, requests))
    status = [a.status_code for a in answers]
    assert status == [200, 200, 400, 422, 422, 400, 200, 415, 413, 400, 200]
    reasons = [a.json()["detail"] for a in answers if a.status_code != 200]
    for reason, words in zip(reasons, ["cannot decode the image", "missing field 'file'",
                                       "missing field 'image'", "not valid base64",
                                       "Content-Type text/plain", "max_upload_mb=0.01",
                                       "not valid JSON"], strict=True):  # fmt: skip
        assert words in reason
    good = [answers[i] for i in (0, 1, 6, 10)]
    assert_rows_equal([as_row(a) for a in good], [expected[p.name] for p in files])
    # the six requests LitServe saw were answered from one batch, bad ones included
    assert max(a.json()["batch_size"] for a in good) >= 6


def test_server_refuses_to_start_with_a_reason(tiny_run, tmp_path):
    ok = dict(checkpoint=str(tiny_run), device="cpu")
    corrupt = tmp_path / "trainable.safetensors"
    corrupt.write_bytes(b"garbage" * 10)
    cases = [
        (dict(ok, checkpoint=str(tmp_path / "nope")), CheckpointError, "does not exist"),
        (dict(ok, checkpoint=str(corrupt)), CheckpointError, "trainable.safetensors"),
        (dict(ok, budget=0.01), ConfigError, "below the cost of exit 1"),
        (dict(ok, thresholds=[0.1, 0.2, 0.3]), ConfigError, "thresholds has 3 values"),
        (dict(ok, max_batch_size=0), ConfigError, "max_batch_size=0"),
        (dict(ok, precision="8"), ConfigError, "precision='8' must be one of"),
    ]
    for values, error, message in cases:
        with pytest.raises(error, match=message):
            build_server(serve_cfg(**values))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port={port} on host=127.0.0.1 cannot be used"):
            serve(serve_cfg(**ok, port=port))
        result = subprocess.run(
            [sys.executable, "-m", "met_lightning.serve", f"checkpoint={tiny_run}",
             f"port={port}"], capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "cannot be used" in result.stderr


def start_server(checkpoint, *overrides, env=None):
    """A real server process on 127.0.0.1 (its own process group), once healthy: (process, url)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "met_lightning.serve", f"checkpoint={checkpoint}", f"port={port}",
         "device=cpu", *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_healthy(server, url, 120)
    return server, url


def group_processes(pgid):
    """The live (not zombie) processes of the process group `pgid`."""
    if not os.path.isdir("/proc"):  # no /proc: any process, zombies included
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(group) == pgid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


class SlowUpload(threading.Thread):
    """A multipart upload of `path` that sends its second half only once `go` is set: a request
    surely in flight (the server is reading it) until then. Its answer (or error): `.answer`."""

    def __init__(self, url, path, go):
        super().__init__()
        self.url, self.path, self.go, self.answer = url, path, go, None

    def run(self):
        head = (
            '--b0undary\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        )
        body = head.encode() + self.path.read_bytes() + b"\r\n--b0undary--\r\n"
        half = len(body) // 2

        def chunks():
            yield body[:half]
            self.go.wait(60)
            yield body[half:]

        headers = {"content-type": "multipart/form-data; boundary=b0undary",
                   "content-length": str(len(body))}  # fmt: skip
        try:
            self.answer = httpx.post(f"{self.url}/predict", content=chunks(), headers=headers,
                                     timeout=60)  # fmt: skip
        except httpx.HTTPError as err:
            self.answer = err


def stop_while_in_flight(server, url, send_stop, files, expected, drain_timeout):
    """Start one slow upload per file, stop the server with `send_stop()` while they are in flight,
    then check: new connections refused, every upload answered right, exit 0 within the drain
    time (+ a margin for a loaded machine), no process of its group left, no traceback."""
    go = threading.Event()
    uploads = [SlowUpload(url, path, go) for path in files]
    try:
        for upload in uploads:
            upload.start()
        time.sleep(2.0)  # the server has accepted them and reads their bodies
        stopped_at = time.monotonic()
        send_stop()
        refused = False
        while not refused and time.monotonic() < stopped_at + 10:
            try:
                httpx.get(f"{url}/health", timeout=1)
            except httpx.ConnectError:
                refused = True
            except httpx.TransportError:  # accepted as the listener closed
                pass
            time.sleep(0.1)
        go.set()
        for upload in uploads:
            upload.join(timeout=60)
        try:
            code = server.wait(timeout=drain_timeout + 30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not exit within {drain_timeout + 30} s of the signal")
        took = time.monotonic() - stopped_at
        left = group_processes(server.pid)
        for _ in range(50):  # the last ones may need a moment to go
            if not left:
                break
            time.sleep(0.1)
            left = group_processes(server.pid)
    finally:
        go.set()
        if server.poll() is None or group_processes(server.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
    errors = server.stderr.read()
    assert refused, "the server still accepted connections after the signal"
    for path, upload in zip(files, uploads, strict=True):
        assert isinstance(upload.answer, httpx.Response), upload.answer
        assert upload.answer.status_code == 200, upload.answer.text
        assert_rows_equal([as_row(upload.answer)], [expected[path.name]])
    assert code == 0, errors[-3000:]
    assert took < drain_timeout + 30
    assert not left, f"processes left in the server's group: {left}"
    assert "Traceback" not in errors, errors[-3000:]
    return took


def test_loopback_server_under_a_short_load(tiny_run, tmp_path):
    """A real server process on 127.0.0.1: 4 clients for 3 s, every answer right; then Ctrl+C
    (SIGINT to the whole group) while uploads are in flight: answered, and everything stops."""
    inputs = write_digits(tmp_path / "in", range(12))
    files = sorted(inputs.iterdir())
    threshold = mixed_threshold(tiny_run, inputs)
    expected = expected_rows(tiny_run, inputs, thresholds=[threshold])
    # where the server makes its metrics folder (no PROMETHEUS_... given); short, as it is also
    # where multiprocessing puts its sockets (AF_UNIX paths: 107 bytes; tmp_path can be longer)
    temp = Path(tempfile.mkdtemp(prefix="met-serve-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    server, url = start_server(tiny_run, f"thresholds=[{threshold!r}]", "max_batch_size=8",
                               "batch_timeout=0.01", "drain_timeout=20",
                               env={**env, "TMPDIR": str(temp)})  # fmt: skip
    assert len(list(temp.glob("met-metrics-*"))) == 1
    try:
        results, wrong = [], []
        stop = time.monotonic() + 3.0

        def client(offset):
            with httpx.Client(base_url=url, timeout=30) as http:
                i = offset
                while time.monotonic() < stop:
                    path = files[i % len(files)]
                    answer = http.post("/predict", files={"file": (path.name, path.read_bytes())})
                    results.append(answer.status_code)
                    try:
                        assert answer.status_code == 200
                        assert_rows_equal([as_row(answer)], [expected[path.name]])
                    except AssertionError:
                        wrong.append((path.name, answer.status_code, answer.text))
                    i += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(results) >= 8 and not wrong, wrong[:3]
    except BaseException:
        os.killpg(server.pid, signal.SIGKILL)
        raise
    stop_while_in_flight(server, url, lambda: os.killpg(server.pid, signal.SIGINT), files[:3],
                         expected, drain_timeout=20)  # fmt: skip
    assert not list(temp.glob("met-metrics-*"))  # the metrics folder it made is gone with it
    shutil.rmtree(temp, ignore_errors=True)


def test_serve_removes_the_metrics_folder_it_made_never_the_users(tiny_run, tmp_path, monkeypatch):
    """serve() makes a PROMETHEUS_MULTIPROC_DIR folder when none is given and removes it when it
    stops (here: a config error once it was made); a folder the user gave is left alone."""
    cfg = serve_cfg(checkpoint=str(tiny_run), device="cpu", port=free_port(), precision="8")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ConfigError, match="precision='8'"):
        serve(cfg)
    assert list(tmp_path.iterdir()) == [] and ENV not in os.environ
    user = tmp_path / "user"
    monkeypatch.setenv(ENV, str(user))
    with pytest.raises(ConfigError, match="precision='8'"):
        serve(cfg)
    assert user.is_dir() and os.environ[ENV] == str(user)


def test_a_worker_that_cannot_load_the_model_ends_the_cli_with_one_error_line() -> None:
    """The worker logs its own error (a missing backbone file, say); the CLI then exits with
    `error: ...` (a MetError), not a traceback of its own."""
    server = type("Server", (), {"workers_setup_status": {0: WorkerSetupStatus.ERROR}})()
    with pytest.raises(MetError, match="the inference worker failed to load the model"):
        wait_until_ready(server, [])
