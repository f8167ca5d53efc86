"""The server takes untrusted requests: every failure is that request's 4xx, decoded size is
bounded, stop drains, /info names no host path (issue 19, items 7-10)."""

import asyncio
import base64
import io
import json
import os
import signal

import numpy as np
import pytest
from PIL import Image

from met_lightning.data.base import InputSpec
from met_lightning.data.images import decode_error, decode_image, header_error, load_image
from met_lightning.errors import ConfigError, DataError
from tests.test_predict import write_digits

# the tiny run's input (a 3-channel ViT on 32 px)
SPEC = InputSpec(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)

pytest.importorskip("litserve")
from met_lightning.serve import RequestGuard, build_server  # noqa: E402
from tests.test_serve import (  # noqa: E402
    as_json,
    as_row,
    assert_rows_equal,
    expected_rows,
    post_all,
    serve_cfg,
    start_server,
    stop_while_in_flight,
    upload,
)


def fuzzed_dds():
    """A DDS whose pixel-format flags are zeroed: Pillow raises NotImplementedError on open."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="DDS")
    data = bytearray(buffer.getvalue())
    data[80] = 0  # DDS_PIXELFORMAT.dwFlags (magic 4 + header 72 + pixel format size 4)
    with pytest.raises(NotImplementedError):
        Image.open(io.BytesIO(data))
    return bytes(data)


def fuzzed_im():
    """An IM file of height 8.5: Pillow opens it, then raises TypeError when decoding."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="IM")
    data = buffer.getvalue().replace(b"8*8", b"8*8.5")
    with pytest.raises(TypeError), Image.open(io.BytesIO(data)) as image:
        image.load()
    return data


def tiny_huge_png(mode, side):
    """A blank `side` x `side` PNG: a few KB on disk, hundreds of MB decoded."""
    buffer = io.BytesIO()
    Image.new(mode, (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def big_jpeg(width=4000, height=3000):
    """A 12-megapixel JPEG (a smooth gradient), over the default max_image_pixels."""
    pixels = np.full((height, width, 3), 128, np.uint8)
    pixels[..., 0] = np.linspace(0, 255, width).astype(np.uint8)
    pixels[..., 1] = np.linspace(0, 255, height).astype(np.uint8)[:, None]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def file_request(name, data):
    return {"files": {"file": (name, data, "application/octet-stream")}}


def nested_json(depth, image=None):
    inner = "[" * depth + "]" * depth
    body = f'{{"image": {json.dumps(image)}, "meta": {inner}}}' if image else inner
    return {"content": body.encode(), "headers": {"content-type": "application/json"}}


@pytest.fixture(scope="module")
def attacked(tiny_run, tmp_path_factory):
    """One in-process server (default limits) sent good, malformed and huge-pixel requests
    together, in one batch: (the good files, predict's rows, the answers by request name)."""
    inputs = write_digits(tmp_path_factory.mktemp("in"), range(4))
    jpeg = big_jpeg()
    with Image.open(io.BytesIO(jpeg)) as image:  # what the server should see: a 1/2-scale decode
        image.draft(None, (2000, 1500))
        drafted = decode_image(image, SPEC)
    assert drafted.size == (2000, 1500)
    drafted.save(inputs / "drafted.png")
    files = sorted(p for p in inputs.iterdir() if p.name != "drafted.png")
    expected = expected_rows(tiny_run, inputs)
    good_image = files[0].read_bytes()
    pngs = {
        "9400x9400 1-bit": tiny_huge_png("1", 9400),
        "13000x13000 1-bit": tiny_huge_png("1", 13000),
        "4000x4000 16-bit": tiny_huge_png("I;16", 4000),
    }
    assert all(len(data) < 40_000 for data in pngs.values()), {k: len(v) for k, v in pngs.items()}
    requests = {
        **{p.name: upload(p) if i % 2 else as_json(p) for i, p in enumerate(files)},
        "fuzzed DDS": file_request("x.png", fuzzed_dds()),
        "fuzzed IM": file_request("x.png", fuzzed_im()),
        "fuzzed IM as JSON": {"json": {"image": base64.b64encode(fuzzed_im()).decode()}},
        "JSON 50000 deep": nested_json(50_000),
        "no boundary": {"content": b"--x\r\n\r\n--x--\r\n",
                        "headers": {"content-type": "multipart/form-data"}},  # fmt: skip
        "bad boundary": {"content": upload_body(good_image),
                         "headers": {"content-type": "multipart/form-data; boundary=other"}},
        **{name: file_request("huge.png", data) for name, data in pngs.items()},
        "12 MP JPEG": file_request("photo.jpg", jpeg),
        # answered: only the image field is passed on (deep nesting would fail LitServe's pickling)
        "JSON 600 deep beside the image": nested_json(600, base64.b64encode(good_image).decode()),
    }  # fmt: skip
    server, _ = build_server(serve_cfg(checkpoint=str(tiny_run), device="cpu", max_batch_size=32,
                                       batch_timeout=0.5))  # fmt: skip
    _, _, answers = asyncio.run(post_all(server, list(requests.values())))
    return files, expected, dict(zip(requests, answers, strict=True))


def upload_body(data):
    return (
        b'--mine\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        + data
        + b"\r\n--mine--\r\n"
    )


def test_item7_a_request_any_decoder_or_parser_fails_on_fails_alone(attacked):
    files, expected, answers = attacked
    status = {name: answer.status_code for name, answer in answers.items()}
    for name in ("fuzzed DDS", "fuzzed IM", "fuzzed IM as JSON"):
        assert status[name] == 400, (name, answers[name].text)
    assert "NotImplementedError" in answers["fuzzed DDS"].json()["detail"]
    assert "TypeError" in answers["fuzzed IM"].json()["detail"]
    assert status["JSON 50000 deep"] == 400
    assert "nested too deep" in answers["JSON 50000 deep"].json()["detail"]
    for name in ("no boundary", "bad boundary"):
        assert status[name] == 400, (name, answers[name].text)
        assert "multipart body cannot be parsed" in answers[name].json()["detail"]
    good = [answers[p.name] for p in files]
    assert [a.status_code for a in good] == [200] * len(files)
    assert_rows_equal([as_row(a) for a in good], [expected[p.name] for p in files])
    deep = answers["JSON 600 deep beside the image"]
    assert deep.status_code == 200, deep.text
    assert_rows_equal([as_row(deep)], [expected[files[0].name]])
    # they were answered from the batches that held the bad requests
    assert max(a.json()["batch_size"] for a in good) > len(files)


def test_item7_image_loading_calls_any_decoder_failure_undecodable(tmp_path):
    dds, im = tmp_path / "dds.png", tmp_path / "im.png"
    dds.write_bytes(fuzzed_dds())
    im.write_bytes(fuzzed_im())
    assert header_error(dds).startswith("NotImplementedError")
    assert header_error(im) is None and decode_error(im).startswith("TypeError")
    for path, kind in ((dds, "NotImplementedError"), (im, "TypeError")):
        with pytest.raises(DataError, match=f"cannot decode image {path} .*{kind}"):
            load_image(path, SPEC, "a test")
    with pytest.raises(DataError, match="does not exist"):
        load_image(tmp_path / "missing.png", SPEC, "a test")


def test_item8_decoded_pixels_are_bounded_before_decoding(attacked, tiny_run):
    _, expected, answers = attacked
    for name in ("9400x9400 1-bit", "13000x13000 1-bit", "4000x4000 16-bit"):
        answer = answers[name]
        assert answer.status_code == 413, (name, answer.text)
        size = name.split()[0]
        assert f"the image is {size}" in answer.json()["detail"]
        assert "max_image_pixels=10000000" in answer.json()["detail"]
    photo = answers["12 MP JPEG"]  # decoded at 1/2 scale, not refused
    assert photo.status_code == 200, photo.text
    assert_rows_equal([as_row(photo)], [expected["drafted.png"]])
    with pytest.raises(ConfigError, match="max_image_pixels=100 is below the model's input"):
        build_server(serve_cfg(checkpoint=str(tiny_run), device="cpu", max_image_pixels=100))


def test_item9_sigterm_drains_in_flight_requests_and_stops_every_process(tiny_run, tmp_path):
    """SIGTERM to the main process only (docker stop, Kubernetes): in-flight uploads answered,
    new connections refused, exit 0, no worker left. (SIGINT to the whole group, Ctrl+C: the
    loopback test of tests/test_serve.py.)"""
    inputs = write_digits(tmp_path / "in", range(3))
    files = sorted(inputs.iterdir())
    expected = expected_rows(tiny_run, inputs)
    server, url = start_server(tiny_run, "max_batch_size=8", "batch_timeout=0.05",
                               "drain_timeout=20")  # fmt: skip
    took = stop_while_in_flight(server, url, lambda: os.kill(server.pid, signal.SIGTERM), files,
                                expected, drain_timeout=20)  # fmt: skip
    assert took < 20


def test_item9_a_request_still_running_when_the_drain_ends_gets_a_503():
    """uvicorn cancels the requests still running at the end of drain_timeout: RequestGuard
    answers them 503 (no dropped connection, no traceback)."""

    async def never_answers(scope, receive, send):
        await receive()
        await asyncio.Event().wait()

    async def run():
        sent = []
        body = json.dumps({"image": "AAAA"}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        scope = {"type": "http", "method": "POST", "path": "/predict", "query_string": b"",
                 "headers": [(b"content-type", b"application/json")]}  # fmt: skip

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        task = asyncio.create_task(RequestGuard(never_answers, 1.0)(scope, receive, send))
        await asyncio.sleep(0.05)
        task.cancel()  # what uvicorn does when timeout_graceful_shutdown is over
        await task
        return sent

    sent = asyncio.run(run())
    assert sent[0]["status"] == 503
    assert b"stopped before answering" in sent[1]["body"]


def test_item10_info_names_the_run_not_the_host_path(tiny_run):
    _, info = build_server(serve_cfg(checkpoint=str(tiny_run), device="cpu"))
    assert info["checkpoint"] == tiny_run.name
    assert str(tiny_run.parent) not in json.dumps(info)
    _, info = build_server(
        serve_cfg(checkpoint=str(tiny_run / "trainable.safetensors"), device="cpu")
    )
    assert info["checkpoint"] == f"{tiny_run.name}/trainable.safetensors"
